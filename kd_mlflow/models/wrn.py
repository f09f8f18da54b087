"""Wide ResNet (Zagoruyko & Komodakis), pre-activation blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureNet


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(FeatureNet):
    """WRN-depth-width. Stage outputs are sums before the next BN-ReLU, i.e. pre-ReLU;
    the BN that precedes each stage's ReLU is the next stage's first ``bn1`` (and the
    final ``bn`` for the last stage)."""

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages = []
        in_planes = 16
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(in_planes, w, (1 if i == 0 else 2) if j == 0 else 1))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.stage_channels = widths
        self.init_weights(zero_linear_bias=True)

    def head_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.bn(h)

    def bn_before_relu(self):
        return [self.stages[1][0].bn1, self.stages[2][0].bn1, self.bn]
