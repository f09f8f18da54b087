"""Hinton et al. (2015): the student matches the frozen teacher's softened class
probabilities."""

from __future__ import annotations

from ..base import Distiller
from ..logits import hinton_terms


class HintonKD(Distiller):
    """(1 - alpha) * CE(s, y) + alpha * T^2 * KL(p_t^T || p_s^T)."""

    def forward(self, x, y):
        t_logits = self.teacher_logits(x)
        logits = self.student(x)
        return logits, hinton_terms(logits, t_logits, y, self.cfg)
