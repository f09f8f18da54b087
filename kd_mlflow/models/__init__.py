"""Model zoo: ``create_model(name, num_classes, in_channels)``."""

from __future__ import annotations

import re

from .base import FeatureNet, Features
from .resnet import cifar_resnet, imagenet_style_resnet
from .torchvision_models import TorchvisionNet, is_torchvision_architecture
from .wrn import WideResNet

CIFAR_RESNET_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
IMAGENET_STYLE = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")

ARCHITECTURES = tuple(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS) + tuple(IMAGENET_STYLE) + (
    "wrn-<depth>-<width> (depth 6n+4, e.g. wrn-16-2, wrn-40-2)",
    "tv-<torchvision classification model> (e.g. tv-resnet18, tv-mobilenet_v3_small; a teacher may also be "
    "written torchvision:<name>)",
)


def is_known_architecture(name: str) -> bool:
    if is_torchvision_architecture(name):
        return True
    if name in IMAGENET_STYLE or name in {f"resnet{d}" for d in CIFAR_RESNET_DEPTHS}:
        return True
    m = _WRN.match(name)
    return bool(m) and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(1)) >= 10 and int(m.group(2)) >= 1


def create_model(name: str, num_classes: int, in_channels: int) -> FeatureNet:
    if not is_known_architecture(name):
        raise ValueError(
            f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}"
        )
    if is_torchvision_architecture(name):
        return TorchvisionNet(name, num_classes, in_channels)
    if name in IMAGENET_STYLE:
        return imagenet_style_resnet(IMAGENET_STYLE[name], num_classes, in_channels)
    m = _WRN.match(name)
    if m:
        return WideResNet(int(m.group(1)), int(m.group(2)), num_classes, in_channels)
    return cifar_resnet(int(name[len("resnet"):]), num_classes, in_channels)


__all__ = ["ARCHITECTURES", "FeatureNet", "Features", "create_model", "is_known_architecture"]
