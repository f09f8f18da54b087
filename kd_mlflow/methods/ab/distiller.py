"""Activation Boundaries (Heo et al., AAAI 2019): first teach the student where the
teacher's neurons switch on and off, then train it with ordinary Hinton KD."""

from __future__ import annotations

import torch

from . import initialisation_epochs
from ..base import Distiller
from ..features import connected_pre_relu_pairs, conv_bn_connectors
from ..logits import hinton_terms


def ab_loss(student_resp: torch.Tensor, teacher_resp: torch.Tensor, margin: float) -> torch.Tensor:
    """Alternative-L2 activation-boundary loss, averaged over every element.

    Per element, with s the (connected) student pre-ReLU response and t the teacher's:
    ``(m + s)^2`` where the teacher is off (t <= 0) but s > -m, plus ``(m - s)^2`` where
    the teacher is on (t > 0) but s <= m; zero otherwise. The sum over elements is
    divided by the batch size AND by the per-sample element count C*H*W, i.e. it is the
    mean over elements. Why not the reference's sum / batch / 1000: that scale grows
    with width x resolution, which here ranges over 16..512 channels, 4..32 pixels and
    two input sizes, so one learning rate would be right for some pairs and far off for
    others; the mean is ~m^2 at the start of training for every pair.
    """
    s = student_resp.float()
    t = teacher_resp.float()
    off = (s > -margin) & (t <= 0)
    on = (s <= margin) & (t > 0)
    loss = (margin + s).pow(2) * off + (margin - s).pow(2) * on
    return loss.mean()


class ActivationBoundaries(Distiller):
    """Phase 1 (epochs < initialisation_epochs(cfg)): {"ab"} only, the weighted AB loss of the
    paired stages (weights 1/4, 1/2, 1 shallow to deep). Phase 2: Hinton KD
    {"ce", "kd"}; the connectors are then unused."""

    leaves_parameters_unused = True  # phase 1 leaves the classifier out, phase 2 the connectors

    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.pairs, self.connectors, self.stage_weights = conv_bn_connectors(student, self.teacher)
        self.boundary_phase = initialisation_epochs(cfg) > 0

    def on_epoch_start(self, epoch: int) -> None:
        self.boundary_phase = epoch < initialisation_epochs(self.cfg)

    def forward(self, x, y):
        if not self.boundary_phase:
            with torch.no_grad():
                t_logits = self.teacher(x)
            logits = self.student(x)
            return logits, hinton_terms(logits, t_logits, y, self.cfg)

        with torch.no_grad():
            t = self.teacher.features(x)
        s = self.student.features(x)
        total = 0.0
        for w, fs, ft in connected_pre_relu_pairs(self, s.stages, t.stages):
            total = total + w * ab_loss(fs, ft, self.cfg.ab_margin)
        return s.logits, {"ab": total}
