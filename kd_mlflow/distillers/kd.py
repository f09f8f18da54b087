from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch.

    The T^2 factor keeps the gradient scale of the soft term independent of T
    (Hinton et al., 2015). Computed in fp32 whatever the autocast precision: a KL of
    two near-equal distributions loses everything in bf16.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class HintonKD(Distiller):
    """(1 - alpha) * CE(s, y) + alpha * T^2 * KL(p_t^T || p_s^T)."""

    def forward(self, x, y):
        t_logits = self.teacher_logits(x)
        logits = self.student(x)
        a = self.cfg.alpha
        return logits, {
            "ce": (1 - a) * F.cross_entropy(logits, y),
            "kd": a * hinton_kd_loss(logits, t_logits, self.cfg.temperature),
        }
