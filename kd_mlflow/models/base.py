from __future__ import annotations

from typing import NamedTuple

import torch
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
    fc: nn.Linear

    def forward_stages(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

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
