"""KD from an ensemble of frozen teachers: the mean of the per-teacher KL terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Distiller
from ..logits import compared_logits


def multi_teacher_kd_loss(student_logits: torch.Tensor, teacher_logits, temperature: float,
                          standardize: bool = False) -> torch.Tensor:
    """T^2 * (1/K) * sum_k KL(softmax(t_k/T) || softmax(s/T)), each KL summed over classes
    and averaged over the batch (batchmean).

    ``teacher_logits`` is a sequence of K (B, C) tensors or one (K, B, C) tensor. This is
    the mean of the K per-teacher KL terms, not the KL to the averaged teacher
    distribution: each member pulls the student towards its own soft labels.
    ``standardize``: every logit vector z-scored per sample first.
    """
    t = temperature
    if not torch.is_tensor(teacher_logits):
        teacher_logits = torch.stack([z.float() for z in teacher_logits])
    k, b = teacher_logits.shape[0], teacher_logits.shape[1]
    student_logits, teacher_logits = compared_logits(student_logits, teacher_logits, standardize)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=2)
    kl_sum = F.kl_div(log_p_s.unsqueeze(0).expand_as(log_p_t), log_p_t, reduction="sum", log_target=True)
    return kl_sum / (k * b) * (t * t)


class MultiTeacherKD(Distiller):
    """(1 - alpha) * CE(s, y) + alpha * T^2 * mean_k KL(p_tk^T || p_s^T) over an ensemble
    of K >= 2 frozen teachers (architectures may differ; class counts agree)."""

    def __init__(self, student, teachers=(), cfg=None):
        super().__init__(student, teachers, cfg)
        if len(self.teachers) < 2:
            raise ValueError(
                f"MultiTeacherKD needs an ensemble of >= 2 teachers, got {len(self.teachers)}; "
                f"use mode 'kd' for a single teacher"
            )

    @torch.no_grad()
    def ensemble_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, C) fp32 logits of every teacher, one forward each."""
        return torch.stack([self.teacher_logits(x, k).float() for k in range(len(self.teachers))])

    def forward(self, x, y):
        t_logits = self.ensemble_logits(x)
        logits = self.student(x)
        a = self.cfg.alpha
        return logits, {
            "ce": (1 - a) * F.cross_entropy(logits.float(), y),
            "kd": a * multi_teacher_kd_loss(logits, t_logits, self.cfg.temperature, self.cfg.logit_standardization),
        }
