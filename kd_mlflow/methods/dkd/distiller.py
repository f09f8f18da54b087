"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

At temperature T the KL of Hinton's KD splits, per sample, into two parts:
``KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD`` where

* TCKD (target class KD) is the KL between the binary distributions
  ``[p[y], 1 - p[y]]`` of teacher and student, and
* NCKD (non-target class KD) is the KL between the teacher's and student's softmax over
  the non-target classes only (each renormalised over those classes).

DKD drops the ``1 - p_t[y]`` factor that suppresses NCKD where the teacher is confident
and weights the parts freely: ``CE + w(epoch) * T^2 * (dkd_alpha * TCKD + dkd_beta * NCKD)``,
batch means, with the linear warm-up ``w = min((epoch + 1) / dkd_warmup, 1)``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..base import Distiller
from ..logits import compared_logits


def _non_target(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, C-1]: every column but each row's target class, in order."""
    keep = torch.ones_like(z, dtype=torch.bool).scatter_(1, y.unsqueeze(1), False)
    return z[keep].view(z.shape[0], z.shape[1] - 1)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (no T^2, no weights): (TCKD [B], NCKD [B]) at temperature T, in fp32.

    log p[y] and log(1 - p[y]) are taken as differences of logsumexps (never log of a
    probability that rounds to 0 or 1); NCKD is the KL of log_softmax over the C - 1
    non-target logits, which is exactly the renormalised non-target distribution.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature

    def binary_log(z):
        all_ = torch.logsumexp(z, dim=1)
        target = z.gather(1, y.unsqueeze(1)).squeeze(1)
        return torch.stack([target - all_, torch.logsumexp(_non_target(z, y), dim=1) - all_], dim=1)

    b_s, b_t = binary_log(s), binary_log(t)
    tckd = (b_t.exp() * (b_t - b_s)).sum(dim=1)
    n_s, n_t = F.log_softmax(_non_target(s, y), dim=1), F.log_softmax(_non_target(t, y), dim=1)
    nckd = (n_t.exp() * (n_t - n_s)).sum(dim=1)
    return tckd, nckd


def dkd_terms(student_logits, teacher_logits, y, cfg, warmup_factor: float = 1.0) -> dict:
    """{"ce": CE, "tckd": w dkd_alpha T^2 mean TCKD, "nckd": w dkd_beta T^2 mean NCKD}; the
    TCKD/NCKD logits are z-scored first when cfg.logit_standardization."""
    s, t = compared_logits(student_logits, teacher_logits, cfg.logit_standardization)
    tckd, nckd = dkd_parts(s, t, y, cfg.temperature)
    scale = warmup_factor * cfg.temperature ** 2
    return {
        "ce": F.cross_entropy(student_logits.float(), y),
        "tckd": scale * cfg.dkd_alpha * tckd.mean(),
        "nckd": scale * cfg.dkd_beta * nckd.mean(),
    }


def warmup_epochs(cfg) -> int:
    """dkd_warmup, or the run's length when the run is shorter (so the full weight is
    reached, at the last epoch)."""
    return min(cfg.dkd_warmup, cfg.epochs)


class DecoupledKD(Distiller):
    """CE + linearly warmed-up TCKD and NCKD from one frozen teacher (see the module docstring)."""

    def __init__(self, student, teachers=(), cfg=None):
        super().__init__(student, teachers, cfg)
        if cfg.dkd_warmup > cfg.epochs:
            warnings.warn(f"dkd_warmup={cfg.dkd_warmup} is longer than the run (epochs={cfg.epochs}); "
                          f"the warm-up is scaled to the run: full DKD weight at epoch {cfg.epochs}",
                          stacklevel=2)
        self.warmup_factor = 1.0
        self.on_epoch_start(0)

    def on_epoch_start(self, epoch: int) -> None:
        # A function of the epoch alone, so a resumed run gets the same factor.
        warmup = warmup_epochs(self.cfg)
        self.warmup_factor = min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0

    def forward(self, x, y):
        t_logits = self.teacher_logits(x)
        logits = self.student(x)
        return logits, dkd_terms(logits, t_logits, y, self.cfg, self.warmup_factor)
