"""A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019): the student's
pre-ReLU features, through a connector, regress the teacher's pre-ReLU features with
the teacher's negative responses replaced by a per-channel margin, under a partial L2
that ignores where both are already "off"."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Distiller
from ..features import connected_pre_relu_pairs, conv_bn_connectors


def overhaul_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel E[x | x < 0] for x ~ N(beta, gamma^2), from a BN's affine parameters.

    ``m - s * phi(m/s) / Phi(-m/s)`` with m = beta, s = |gamma|, a = m/s, in float64.
    No threshold on Phi(-a) is needed: for a <= 50 the ratio is taken in log space
    (``log phi(a) - log Phi(-a)``), finite however small Phi(-a) is; beyond, where even
    that difference loses digits, the asymptotic series of the same quantity,
    ``-s (1/a - 2/a^3 + 10/a^5 - 74/a^7)``, is exact to ~1e-13 relative. So a channel
    that is almost never negative gets a margin just below zero (about -s^2/m), as the
    conditional mean should. (The reference instead switches to -3s when
    Phi(-a) < 0.001.) s is floored at 1e-12, so a zero gamma gives beta when beta < 0
    and ~0 otherwise. Returns a float32 tensor of shape [C].
    """
    s = bn.weight.detach().double().abs().clamp_min(1e-12)
    m = bn.bias.detach().double()
    a = m / s
    tail = a > 50
    a_exact = torch.where(tail, torch.zeros_like(a), a)
    log_pdf = -0.5 * a_exact * a_exact - 0.5 * math.log(2 * math.pi)
    exact = m - s * torch.exp(log_pdf - torch.special.log_ndtr(-a_exact))
    inv = 1.0 / torch.where(tail, a, torch.ones_like(a))
    inv2 = inv * inv
    series = -s * inv * (1 - inv2 * (2 - inv2 * (10 - 74 * inv2)))
    return torch.where(tail, series, exact).float()


def partial_l2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sum of (s - t)^2 over every element except where s <= t and t <= 0 (both "off",
    the student at least as negative as the target: nothing to correct). Not averaged."""
    s, t = s.float(), t.float()
    skip = (s <= t) & (t <= 0)
    return ((s - t).pow(2) * ~skip).sum()


class Overhaul(Distiller):
    """{"ce": CE, "oh": oh_weight * sum_i w_i * partial_l2(C_i(s_i), max(t_i, margin_i)) / B},
    w_i = 1/2^(n-1-i) shallow to deep. Margins come from the teacher's BN before each
    paired stage's ReLU, once, at construction (the teacher is frozen)."""

    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.pairs, self.connectors, self.stage_weights = conv_bn_connectors(student, self.teacher)
        bns = self.teacher.bn_before_relu()
        for k, (_, ti) in enumerate(self.pairs):
            self.register_buffer(f"margin{k}", overhaul_margin(bns[ti]).view(1, -1, 1, 1))

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{k}") for k in range(len(self.pairs))]

    def forward(self, x, y):
        with torch.no_grad():
            t = self.teacher.features(x)
        s = self.student.features(x)
        total = 0.0
        for (w, fs, ft), margin in zip(connected_pre_relu_pairs(self, s.stages, t.stages), self.margins()):
            total = total + w * partial_l2(fs, torch.maximum(ft, margin.float()))
        return s.logits, {
            "ce": F.cross_entropy(s.logits.float(), y),
            "oh": self.cfg.oh_weight * total / x.shape[0],
        }
