"""Patient Knowledge Distillation (Sun et al., 2019), for CNNs: Hinton KD plus, at every
paired stage, the mean squared error between the L2-normalised, globally average-pooled
student and teacher features.

Scale: the authors' code takes an MSE *mean* over the batch and the feature dimension,
and beta's published range (10-1000) was tuned on that scale. A sum over channels would
make the term C (16-512) times larger and swamp cross-entropy at any published beta."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller
from .features import paired_stages
from .kd import hinton_terms


def pkd_stage_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """mean over the batch and the C features of (fs/||fs|| - ft/||ft||)^2 for [B, C] vectors."""
    s = F.normalize(fs.float(), p=2, dim=1)
    t = F.normalize(ft.float(), p=2, dim=1)
    return (s - t).pow(2).mean()


class PatientKD(Distiller):
    """{"ce": (1-a) CE, "kd": a KD, "pkd": beta * sum over paired stages of pkd_stage_loss}.
    A linear connector (student width -> teacher width) sits on the pooled student
    vector of each stage whose widths differ; equal widths are compared directly."""

    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.pairs = paired_stages(student, self.teacher)
        self.connectors = nn.ModuleList(
            nn.Linear(cs, ct) if cs != ct else nn.Identity()
            for cs, ct in ((student.stage_channels[si], self.teacher.stage_channels[ti]) for si, ti in self.pairs)
        )

    def forward(self, x, y):
        with torch.no_grad():
            t = self.teacher.features(x)
        s = self.student.features(x)
        total = 0.0
        for (si, ti), connector in zip(self.pairs, self.connectors):
            vs = connector(s.stages[si].float().mean((2, 3)))
            vt = t.stages[ti].float().mean((2, 3))
            total = total + pkd_stage_loss(vs, vt)
        return s.logits, {**hinton_terms(s.logits, t.logits, y, self.cfg), "pkd": self.cfg.beta * total}
