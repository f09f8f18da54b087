"""What kd-mlflow knows about each dataset, without importing torch: config validation
reads it, and the data package (which loads the images) re-exports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple
    crop_padding: int
    hflip: bool
    # Image folders (imagefolder.py): training batches get a random resized crop (instead
    # of the padded crop); the class names and the unreadable images skipped come from
    # the folder.
    resized_crop: bool = False
    class_names: tuple = ()
    skipped_images: int = 0


DATASETS = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), 2, False),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
}
