from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Features(NamedTuple):
    logits: torch.Tensor
    stages: list  # per-stage pre-ReLU feature maps, shallow to deep
    embedding: torch.Tensor  # global-average-pooled penultimate activation


class FeatureNet(nn.Module):
    """A classifier that can also return its per-stage features.

    ``forward(x)`` returns logits only, so the network exports and serves as an
    ordinary classifier; ``features(x)`` returns logits, stage features and the
    pooled embedding from the same single pass.
    """

    stage_channels: list
    stem: nn.Module
    stages: nn.ModuleList
    fc: nn.Linear

    def forward_stages(self, x):
        """-> (each stage's output, shallow to deep; the pooled embedding): stem, stages,
        then ReLU (after ``head_norm``) and global average pooling."""
        feats = []
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        embedding = F.adaptive_avg_pool2d(F.relu(self.head_norm(h)), 1).flatten(1)
        return feats, embedding

    def head_norm(self, h: torch.Tensor) -> torch.Tensor:
        """What the last stage's output passes before the final ReLU: nothing in a
        post-activation network (a pre-activation one has its final BN here)."""
        return h

    def init_weights(self, zero_linear_bias: bool = False) -> None:
        """He (fan_out) init of every conv, BN at weight 1 and bias 0; with
        ``zero_linear_bias`` the classifier's bias at 0 too (else PyTorch's default)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif zero_linear_bias and isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, embedding = self.forward_stages(x)
        return self.fc(embedding)

    def features(self, x: torch.Tensor) -> Features:
        stages, embedding = self.forward_stages(x)
        return Features(self.fc(embedding), stages, embedding)

    @property
    def embedding_dim(self) -> int:
        return self.fc.in_features

    def bn_before_relu(self):  # pragma: no cover - abstract
        raise NotImplementedError
