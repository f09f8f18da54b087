"""Shared pieces of the feature-based distillers (ab, oh, rkd, pkd, sfd).

Stage pairing between networks of different depth: the LAST ``n`` stages are paired,
``n = min(#student stages, #teacher stages)``, so a 4-stage ResNet18 teacher meets a
3-stage CIFAR ResNet student at its three deepest stages. Spatial sizes are only known
in ``forward``; a larger map is average-pooled to the smaller one's HxW there, which
is why every connector is channel-only (1x1 conv or linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller


def paired_stages(student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    """(student stage index, teacher stage index) for the last n stages, shallow to deep."""
    ns, nt = len(student.stage_channels), len(teacher.stage_channels)
    n = min(ns, nt)
    return [(ns - n + i, nt - n + i) for i in range(n)]


def deep_stage_weights(n: int) -> list[float]:
    """1/2^(n-1-i) for i = 0 (shallow) .. n-1 (deep): ..., 1/4, 1/2, 1."""
    return [2.0 ** -(n - 1 - i) for i in range(n)]


def match_spatial(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two NCHW maps to the smaller one's HxW (per axis)."""
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    if tuple(fs.shape[-2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[-2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def conv_bn_connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN: maps student channels onto teacher channels."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


def _bn_is_inside(model: nn.Module, stage_index: int, bn: nn.Module) -> bool:
    stages = getattr(model, "stages", None)
    if stages is None:
        return True
    return any(m is bn for m in stages[stage_index].modules())


@torch.no_grad()
def teacher_pre_relu(teacher: nn.Module, stage_index: int, feat: torch.Tensor) -> torch.Tensor:
    """The teacher's stage feature as the input of its ReLU, in fp32.

    ResNet stage outputs already are ``bn2(...) + residual``. A pre-activation WRN's
    stage output still has to pass the *next* BN (``bn_before_relu()[i]``, which lives
    outside stage i) before its ReLU; AB's sign targets and OH's BN-derived margins refer
    to that BN's output, so it is applied here, with running statistics (the teacher is
    frozen, so nothing is updated). Rule: a BN inside stage i has already run; one
    outside has not.
    """
    feat = feat.float()
    bn = teacher.bn_before_relu()[stage_index]
    if _bn_is_inside(teacher, stage_index, bn):
        return feat
    return F.batch_norm(feat, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training=False, momentum=0.0, eps=bn.eps)


def conv_bn_connectors(student: nn.Module, teacher: nn.Module):
    """-> (paired stages, a 1x1 conv+BN connector per pair, deep-heavy stage weights):
    the setup AB and OH share for comparing pre-ReLU feature maps."""
    pairs = paired_stages(student, teacher)
    connectors = nn.ModuleList(
        conv_bn_connector(student.stage_channels[si], teacher.stage_channels[ti]) for si, ti in pairs
    )
    return pairs, connectors, deep_stage_weights(len(pairs))


def connected_pre_relu_pairs(distiller, s_stages, t_stages):
    """For each paired stage: (weight, connected student map in fp32, teacher pre-ReLU map
    pooled to the same size), from ``distiller.pairs/connectors/stage_weights``."""
    for (si, ti), connector, w in zip(distiller.pairs, distiller.connectors, distiller.stage_weights):
        ft = teacher_pre_relu(distiller.teacher, ti, t_stages[ti])
        fs, ft = match_spatial(s_stages[si], ft)
        yield w, connector(fs).float(), ft



class StageFeatureDistiller(Distiller):
    """A distiller that compares each paired stage as one vector per image (pkd, sfd):
    ``pool`` reduces a stage map (fp32) to [B, C], ``connector(student width, teacher
    width)`` maps the student's vector (a linear layer per pair), and ``stage_loss``
    compares the two; :meth:`stage_terms` sums it over the paired stages."""

    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.pairs = paired_stages(student, self.teacher)
        self.connectors = nn.ModuleList(
            self.connector(student.stage_channels[si], self.teacher.stage_channels[ti]) for si, ti in self.pairs
        )

    def connector(self, student_channels: int, teacher_channels: int) -> nn.Module:
        return nn.Linear(student_channels, teacher_channels)

    def pool(self, feat: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stage_loss(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stage_terms(self, x):
        """-> (student Features, teacher Features, sum over paired stages of stage_loss)."""
        with torch.no_grad():
            t = self.teacher.features(x)
        s = self.student.features(x)
        total = 0.0
        for (si, ti), connector in zip(self.pairs, self.connectors):
            vs = connector(self.pool(s.stages[si].float()))
            vt = self.pool(t.stages[ti].float())
            total = total + self.stage_loss(vs, vt)
        return s, t, total
