"""ResNets for small images.

Blocks hand *pre-ReLU* tensors to each other and apply the ReLU on entry. This is
arithmetically the ordinary post-activation ResNet of He et al., but every stage
output is then naturally the pre-ReLU feature that feature-distillation methods
(AB, Overhaul) need, without hooks or a second forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x_pre: torch.Tensor) -> torch.Tensor:
        x = F.relu(x_pre)
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)


class ResNet(FeatureNet):
    """Stem conv -> stages of BasicBlocks -> ReLU -> global average pool -> linear."""

    def __init__(self, blocks_per_stage, widths, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        )
        stages = []
        in_planes = widths[0]
        for i, (n, w) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, stride if j == 0 else 1))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(in_planes, num_classes)
        self.stage_channels = list(widths)
        self.init_weights()

    def bn_before_relu(self):
        """The BN whose output (plus the residual) is each stage's pre-ReLU feature."""
        return [stage[-1].bn2 for stage in self.stages]


def cifar_resnet(depth: int, num_classes: int, in_channels: int) -> ResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet([n, n, n], [16, 32, 64], num_classes, in_channels)


def imagenet_style_resnet(blocks, num_classes: int, in_channels: int) -> ResNet:
    # 3x3 stem without max-pool, as is usual for 32x32 inputs.
    return ResNet(blocks, [64, 128, 256, 512], num_classes, in_channels)
