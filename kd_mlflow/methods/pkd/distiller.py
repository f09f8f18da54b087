"""Patient Knowledge Distillation (Sun et al., 2019), for CNNs: Hinton KD plus, at every
paired stage, the mean squared error between the L2-normalised, globally average-pooled
student and teacher features.

Scale: the authors' code takes an MSE *mean* over the batch and the feature dimension,
and the published weight range (10-1000) was tuned on that scale. A sum over channels would
make the term C (16-512) times larger and swamp cross-entropy at any published weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..features import StageFeatureDistiller
from ..logits import hinton_terms


def pkd_stage_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """mean over the batch and the C features of (fs/||fs|| - ft/||ft||)^2 for [B, C] vectors."""
    s = F.normalize(fs.float(), p=2, dim=1)
    t = F.normalize(ft.float(), p=2, dim=1)
    return (s - t).pow(2).mean()


class PatientKD(StageFeatureDistiller):
    """{"ce": (1-a) CE, "kd": a KD, "pkd": pkd_weight * sum over paired stages of pkd_stage_loss}
    on globally average-pooled stage features. A linear connector (student width ->
    teacher width) sits on the pooled student vector of each stage whose widths differ;
    equal widths are compared directly."""

    stage_loss = staticmethod(pkd_stage_loss)

    def connector(self, student_channels: int, teacher_channels: int) -> nn.Module:
        return nn.Linear(student_channels, teacher_channels) if student_channels != teacher_channels else nn.Identity()

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        return feat.mean((2, 3))

    def forward(self, x, y):
        s, t, total = self.stage_terms(x)
        return s.logits, {**hinton_terms(s.logits, t.logits, y, self.cfg), "pkd": self.cfg.pkd_weight * total}
