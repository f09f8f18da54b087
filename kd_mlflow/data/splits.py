"""A run's data: the training, validation and test splits as uint8 tensors, carved the same
way for every mode of one seed (so seed k of every mode sees the same images)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError
from .datasets import DATASETS, DatasetInfo
from .sources import data_source, load_arrays

if TYPE_CHECKING:  # load_data's annotation: data needs no config at run time
    from ..config import Config


@dataclass
class Split:
    x: torch.Tensor  # uint8, N x C x H x W
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    unlabeled: Split | None = None  # semi-supervised modes (uda): images whose labels are not used
    # Which images of the dataset's files each split holds (indices into its training or
    # test file, in the order used), and where the files are: the run's Datasets.
    indices: dict | None = None
    source: str = ""
    val_file: str = "train"  # the file (folder) the validation images come from


    def datasets(self) -> list[dict]:
        """The splits as the run's MLflow Datasets: name, source, size and a digest of the
        exact indices used (sha256 of the dataset's name, the split and the int64 indices),
        so two runs can be checked to have trained, selected and tested on the same images."""
        if self.indices is None:
            return []
        out = []
        for context, split in (("train", self.train), ("validation", self.val), ("test", self.test)):
            idx = np.ascontiguousarray(self.indices[context], dtype=np.int64)
            digest = hashlib.sha256(f"{self.info.name}/{context}/".encode() + idx.tobytes()).hexdigest()
            out.append({"name": f"{self.info.name}-{context}", "context": context, "source": self.source,
                        "digest": digest[:32], "rows": len(split),
                        "file": "test" if context == "test" else self.val_file if context == "validation" else "train",
                        "image": f"uint8 {self.info.in_channels}x{self.info.image_size}x{self.info.image_size}"})
        return out


def dataset_info(cfg: Config) -> DatasetInfo:
    """The dataset's facts (classes, channels, size, statistics) without decoding an image."""
    if cfg.dataset != "imagefolder":
        return DATASETS[cfg.dataset]
    from . import imagefolder

    layout = imagefolder.scan_layout(cfg.resolved_data_dir())
    mean, std = imagefolder.normalisation(cfg)
    return DatasetInfo("imagefolder", len(layout.classes), 3, imagefolder.image_size(cfg), mean, std, 0, True,
                       resized_crop=True, class_names=layout.classes)


def _carve(cfg: Config, n: int, name: str, val_from_train: bool = True):
    """-> (train indices, validation indices) of a training file of ``n`` images: a
    permutation seeded with ``cfg.seed``, its first val_size images for validation (when
    they come from the training file), the next train_subset (0 = all) for training."""
    val_size = cfg.val_size if val_from_train else 0
    if val_size >= n:
        raise ConfigError(f"val_size={cfg.val_size} leaves no training images ({name} has {n}); lower it")
    available = n - val_size
    if cfg.train_subset > available:
        raise ConfigError(
            f"train_subset={cfg.train_subset} is larger than the {available} training images of "
            f"{name} left after val_size={val_size}; use 0 for all of them or a smaller number"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    val_idx = perm[:val_size]
    train_idx = perm[val_size:]
    if cfg.train_subset:
        train_idx = train_idx[: cfg.train_subset]
    return train_idx, val_idx


def _load_imagefolder(cfg: Config) -> DataBundle:
    """An image folder's splits (imagefolder.py): decoded into uint8, or, when they do not
    fit in memory (imagefolder.streams), as files that StreamBatches decode per batch.
    Validation from val/ when present, else carved from train like the built-in
    datasets; unreadable images dropped (or the run stopped) per ``corrupt_images``."""
    from . import imagefolder

    info = dataset_info(cfg)
    layout = imagefolder.scan_layout(cfg.resolved_data_dir())
    train_idx, val_idx = _carve(cfg, len(layout.train), str(layout.root / "train"), layout.val is None)
    val_files = layout.val if layout.val is not None else layout.train
    if layout.val is not None:
        val_idx = np.arange(len(layout.val))
    test_idx = np.arange(min(cfg.test_subset or len(layout.test), len(layout.test)))
    stream = imagefolder.streams(cfg, len(train_idx) + len(val_idx) + len(test_idx), info.image_size, layout.root)
    splits, indices, skipped = {}, {}, 0
    for context, files, idx in (("train", layout.train, train_idx), ("validation", val_files, val_idx),
                                ("test", layout.test, test_idx)):
        chosen = [files[i] for i in idx]
        if stream:
            kept, bad = imagefolder.readable_files(chosen, cfg.corrupt_images)
            x = imagefolder.FolderImages(tuple(chosen[i][0] for i in kept), info.image_size)
        else:
            x, kept, bad = imagefolder.decode_all(chosen, info.image_size, cfg.corrupt_images)
            x = torch.from_numpy(x)
        kept = np.asarray(kept, dtype=np.int64)
        skipped += len(bad)
        y = np.asarray([chosen[i][1] for i in kept], dtype=np.int64)
        if len(y) < 2:
            raise ConfigError(f"the {context} split of {layout.root} has {len(y)} readable image(s); it needs >= 2")
        splits[context] = Split(x, torch.from_numpy(y))
        indices[context] = idx[kept]
    if skipped:
        info = dataclasses.replace(info, skipped_images=skipped)
    return DataBundle(info, splits["train"], splits["validation"], splits["test"], indices=indices,
                      source=str(layout.root), val_file="val" if layout.val is not None else "train")


def load_data(cfg: Config) -> DataBundle:
    """Train/val/test splits on the CPU. The validation images are carved from the
    training split by a permutation seeded with ``cfg.seed``; the test split is kept
    apart for the final ``test_acc`` only."""
    if cfg.dataset == "imagefolder":
        return _load_imagefolder(cfg)
    info = DATASETS[cfg.dataset]
    train_x, train_y, test_x, test_y = load_arrays(cfg.dataset, cfg.resolved_data_dir())
    train_idx, val_idx = _carve(cfg, len(train_y), cfg.dataset)
    test_n = cfg.test_subset or len(test_y)

    def split(x, y, idx=None) -> Split:
        if idx is not None:
            x, y = x[idx], y[idx]
        return Split(torch.from_numpy(np.array(x, dtype=np.uint8)), torch.from_numpy(np.array(y, dtype=np.int64)))

    indices = {"train": train_idx, "validation": val_idx, "test": np.arange(test_n)}
    return DataBundle(info, split(train_x, train_y, train_idx), split(train_x, train_y, val_idx),
                      split(test_x[:test_n], test_y[:test_n]), indices=indices,
                      source=data_source(cfg.dataset, cfg.resolved_data_dir()))
