"""Datasets as uint8 tensors, splits, and a device-resident batch iterator.

Fashion-MNIST and CIFAR fit in memory many times over, so the whole split lives on
the training device as uint8 and each batch is cropped, flipped and normalised there
in a few vectorised ops. This removes the per-sample PIL pipeline and the DataLoader
workers that dominate small-model training on a 2-core CPU.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, ConfigError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kd_mlflow"


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


DATASETS = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), 2, False),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
}


# ------------------------------------------------------------------ loading
_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an uint8 IDX file; delete it so it can be fetched again")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); delete it and fetch it again")
    return data.reshape(dims)


def _find_fmnist(directory: Path) -> dict | None:
    for sub in ("", "FashionMNIST/raw", "fashion-mnist", "fashion_mnist"):
        found = {}
        for key, stem in _FMNIST_FILES.items():
            for candidate in (directory / sub / (stem + ".gz"), directory / sub / stem):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == 4:
            return found
    return None


def _load_fashion_mnist(data_dir: str):
    searched = [Path(data_dir)] if data_dir else []
    searched += [Path(DEBIAN_FASHION_MNIST), DEFAULT_CACHE]
    for directory in searched:
        files = _find_fmnist(directory)
        if files:
            break
    else:
        target = Path(data_dir) if data_dir else DEFAULT_CACHE

        def fetch(root: str) -> None:
            for train in (True, False):
                _torchvision("FashionMNIST")(root, train=train, download=True)

        _download(fetch, target, "fashion_mnist",
                  "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                  "or pass -P data_dir=DIR holding the four IDX files")
        files = _find_fmnist(target)
    arrays = {k: _read_idx(p) for k, p in files.items()}
    return (arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None], arrays["test_y"])


def _torchvision(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, name)


def _download(fetch, root: Path, name: str, fix: str):
    try:
        root.mkdir(parents=True, exist_ok=True)
        return fetch(str(root))
    except Exception as exc:  # network down, read-only disk, ...
        raise ConfigError(
            f"dataset {name} is not on this machine and could not be downloaded to {root} "
            f"({type(exc).__name__}: {str(exc)[:120]}); {fix}"
        ) from exc


def _load_cifar(name: str, data_dir: str):
    cls = _torchvision("CIFAR10" if name == "cifar10" else "CIFAR100")
    root = Path(data_dir) if data_dir else DEFAULT_CACHE
    fix = f"pass -P data_dir=DIR holding the torchvision {name} folder, or run once with internet"
    train = _download(lambda r: cls(r, train=True, download=True), root, name, fix)
    test = _download(lambda r: cls(r, train=False, download=True), root, name, fix)
    return (train.data.transpose(0, 3, 1, 2), np.asarray(train.targets),
            test.data.transpose(0, 3, 1, 2), np.asarray(test.targets))


def load_arrays(name: str, data_dir: str = ""):
    """-> (train_x uint8 NCHW, train_y, test_x, test_y) as numpy arrays."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir)
    return _load_cifar(name, data_dir)


# ------------------------------------------------------------------ splits
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


def load_data(cfg: Config) -> DataBundle:
    """Train/val/test splits on the CPU. The validation images are carved from the
    training split by a permutation seeded with ``cfg.seed``; the test split is kept
    apart for the final ``test_acc`` only."""
    info = DATASETS[cfg.dataset]
    train_x, train_y, test_x, test_y = load_arrays(cfg.dataset, cfg.resolved_data_dir())
    n = len(train_y)
    if cfg.val_size >= n:
        raise ConfigError(f"val_size={cfg.val_size} leaves no training images ({cfg.dataset} has {n}); lower it")
    available = n - cfg.val_size
    if cfg.train_subset > available:
        raise ConfigError(
            f"train_subset={cfg.train_subset} is larger than the {available} training images of "
            f"{cfg.dataset} left after val_size={cfg.val_size}; use 0 for all of them or a smaller number"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    val_idx = perm[: cfg.val_size]
    train_idx = perm[cfg.val_size:]
    if cfg.train_subset:
        train_idx = train_idx[: cfg.train_subset]
    test_n = cfg.test_subset or len(test_y)

    def split(x, y, idx=None) -> Split:
        if idx is not None:
            x, y = x[idx], y[idx]
        return Split(torch.from_numpy(np.array(x, dtype=np.uint8)), torch.from_numpy(np.array(y, dtype=np.int64)))

    return DataBundle(info, split(train_x, train_y, train_idx), split(train_x, train_y, val_idx),
                      split(test_x[:test_n], test_y[:test_n]))


# ------------------------------------------------------------------ batches
class DeviceBatches:
    """Iterates (images, labels) batches from uint8 tensors that live on ``device``.

    Augmentation (random crop with zero padding, horizontal flip) and normalisation
    run batched on the device; the random stream comes from a dedicated generator
    so a seed reproduces the same batches.

    Sharded (``world_size`` > 1): ``batch_size`` is the global batch. Every rank draws
    the same order and the same augmentation for the whole global batch from the same
    seed, then keeps its contiguous share of it, so the N shards of a batch concatenated
    are exactly the one-process batch. A last partial batch is split as evenly as
    possible (``global_size`` says how large the current global batch is); it is kept
    when every rank gets at least one image.
    """

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, *, device,
                 shuffle: bool, augment: bool, seed: int = 0, channels_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.info = info
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment
        self.channels_last = channels_last
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.mean = torch.tensor(info.mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(info.std, device=self.device).view(1, -1, 1, 1) * 255
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.global_size = 0  # size of the global batch whose shard was yielded last

    def _keeps_last(self, rest: int) -> bool:
        # A batch of one would break BatchNorm; a shard of none would leave a rank idle.
        return rest > 1 and rest >= self.world_size

    def __len__(self) -> int:
        full, rest = divmod(len(self.y), self.batch_size)
        return full + (1 if self._keeps_last(rest) else 0)

    @property
    def num_images(self) -> int:
        """Images per pass over all ranks (the global count)."""
        full, rest = divmod(len(self.y), self.batch_size)
        return full * self.batch_size + (rest if self._keeps_last(rest) else 0)

    def __iter__(self):
        n = len(self.y)
        order = (torch.randperm(n, device=self.device, generator=self.generator)
                 if self.shuffle else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            b = len(idx)
            lo, hi = b * self.rank // self.world_size, b * (self.rank + 1) // self.world_size
            self.global_size = b
            x = self.x[idx[lo:hi]]
            if self.augment:
                x = self._augment(x, b, lo)
            yield self.normalize(x), self.y[idx[lo:hi]]

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _augment(self, x: torch.Tensor, global_b: int | None = None, offset: int = 0) -> torch.Tensor:
        """Crop/flip ``x``, images ``offset..offset+len(x)`` of a global batch of ``global_b``:
        the draws are made for the whole global batch (the same stream on every rank)."""
        b, c, h, w = x.shape
        global_b = b if global_b is None else global_b
        shard = slice(offset, offset + b)
        p = self.info.crop_padding
        if p:
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (global_b,), device=self.device, generator=self.generator)[shard]
            ox = torch.randint(0, 2 * p + 1, (global_b,), device=self.device, generator=self.generator)[shard]
            rows = (oy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=self.device))[:, None, None, :]
            bi = torch.arange(b, device=self.device)[:, None, None, None]
            ci = torch.arange(c, device=self.device)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.info.hflip:
            flip = torch.rand(global_b, device=self.device, generator=self.generator)[shard] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x
