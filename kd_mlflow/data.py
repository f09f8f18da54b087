"""Datasets as uint8 tensors, splits, and a device-resident batch iterator.

Fashion-MNIST and CIFAR fit in memory many times over, so the whole split lives on
the training device as uint8 and each batch is cropped, flipped and normalised there
in a few vectorised ops. This removes the per-sample PIL pipeline and the DataLoader
workers that dominate small-model training on a 2-core CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import sys
import tarfile
import urllib.request
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import DATASETS, DatasetInfo
from .errors import ConfigError

if TYPE_CHECKING:  # load_data's annotation: data needs no config at run time
    from .config import Config

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kd_mlflow"


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


def _fmnist_dirs(data_dir: str) -> list:
    """Where Fashion-MNIST is looked for, in order: data_dir, Debian's package, the cache."""
    return ([Path(data_dir)] if data_dir else []) + [Path(DEBIAN_FASHION_MNIST), DEFAULT_CACHE]


def _load_fashion_mnist(data_dir: str):
    for directory in _fmnist_dirs(data_dir):
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


# CIFAR from the authors' binary distribution: fixed-size records (label byte(s), then the
# 3072 pixel bytes of one 32x32 image as R, G and B planes), read with numpy. The python
# distribution is a pickle, and unpickling a downloaded file can run any code.
@dataclass(frozen=True)
class CifarLayout:
    url: str
    md5: str  # of the archive, as published on https://www.cs.toronto.edu/~kriz/cifar.html
    folder: str  # what the archive extracts to; data_dir holds it
    train_files: tuple
    test_file: str
    names_file: str
    labels: tuple  # (name, number of values) of each label byte leading a record; the last is the class

    @property
    def record_bytes(self) -> int:
        return len(self.labels) + 3 * 32 * 32

    def files(self) -> tuple:
        return (*self.train_files, self.test_file, self.names_file)


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin",
        "batches.meta.txt", (("label", 10),)),
    "cifar100": CifarLayout(
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8",
        "cifar-100-binary", ("train.bin",), "test.bin", "fine_label_names.txt",
        (("coarse label", 20), ("fine label", 100))),
}


def _cifar_folder(layout: CifarLayout, directory: Path) -> Path | None:
    """The folder under ``directory`` (or ``directory`` itself) holding every data file."""
    for candidate in (directory / layout.folder, directory):
        if all((candidate / f).is_file() for f in (*layout.train_files, layout.test_file)):
            return candidate
    return None


def read_cifar_records(path: Path, layout: CifarLayout):
    """-> (images uint8 N x 3 x 32 x 32, class labels int64 N) of one binary CIFAR file."""
    size = path.stat().st_size
    if size == 0 or size % layout.record_bytes:
        raise ConfigError(
            f"{path} is truncated or not a CIFAR file: {size} bytes is not a whole number of "
            f"{layout.record_bytes}-byte records; delete it and extract or download it again")
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, layout.record_bytes)
    for column, (label, count) in enumerate(layout.labels):
        bad = np.flatnonzero(records[:, column] >= count)
        if bad.size:
            raise ConfigError(
                f"{path} is not a CIFAR file: record {bad[0]} has {label} {records[bad[0], column]}, "
                f"outside 0..{count - 1}; delete it and extract or download it again")
    images = np.ascontiguousarray(records[:, len(layout.labels):]).reshape(-1, 3, 32, 32)
    return images, records[:, len(layout.labels) - 1].astype(np.int64)


def _read_cifar(layout: CifarLayout, folder: Path):
    parts = [read_cifar_records(folder / f, layout) for f in layout.train_files]
    # The training batches are equal parts of one split: a file cut at a record boundary
    # still shows as a count that differs from the first's.
    first = len(parts[0][1])
    for name, (_, labels) in zip(layout.train_files, parts):
        if len(labels) != first:
            raise ConfigError(
                f"{folder / name} is truncated: {len(labels)} records where {layout.train_files[0]} has "
                f"{first}; delete it and extract or download it again")
    test_x, test_y = read_cifar_records(folder / layout.test_file, layout)
    return (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), test_x, test_y)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")  # label order of the IDX files (Xiao et al., 2017)


def class_names(name: str, data_dir: str = "") -> list:
    """The dataset's class names, in label order (the label numbers, with a warning, when a
    CIFAR folder lacks its names file: the images train without it)."""
    if name == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if name == "imagefolder":
        from .imagefolder import scan_layout

        return list(scan_layout(data_dir).classes)
    try:
        return cifar_class_names(name, data_dir)
    except ConfigError as exc:
        print(f"warning: {exc}; the model's classes are named by their label numbers", file=sys.stderr)
        return [str(i) for i in range(DATASETS[name].num_classes)]


def data_source(name: str, data_dir: str = "") -> str:
    """Where the dataset's files were read from (a directory), for the run's Datasets."""
    if name == "fashion_mnist":
        found = next((d for d in _fmnist_dirs(data_dir) if _find_fmnist(d)), None)
    elif name == "imagefolder":
        found = Path(data_dir).expanduser() if data_dir else None
    else:
        found = _cifar_folder(CIFAR_LAYOUTS[name], Path(data_dir) if data_dir else DEFAULT_CACHE)
    return str(Path(found).resolve()) if found else (data_dir or str(DEFAULT_CACHE))


def cifar_class_names(name: str, data_dir: str = "") -> list:
    """The class names shipped with the dataset (``batches.meta.txt``, ``fine_label_names.txt``)."""
    layout = CIFAR_LAYOUTS[name]
    folder = _cifar_folder(layout, Path(data_dir) if data_dir else DEFAULT_CACHE)
    path = folder / layout.names_file if folder else None
    if path is None or not path.is_file():
        raise ConfigError(f"no {layout.names_file} for {name} in {data_dir or DEFAULT_CACHE}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != DATASETS[name].num_classes:
        raise ConfigError(f"{path} names {len(names)} classes, {name} has {DATASETS[name].num_classes}")
    return names


def _fetch_url(url: str, target: Path) -> str:
    """Saves ``url`` as ``target`` -> the md5 of what was saved."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        # said once connected: without a network the error stays the only line
        print(f"downloading {url} to {target.parent}", file=sys.stderr)
        while block := response.read(1 << 20):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _extract_cifar(layout: CifarLayout, archive: Path, root: Path) -> None:
    """Writes only the layout's files, each from a regular-file member at its known path:
    no member name ever becomes a path here, so nothing lands outside ``root``."""
    folder = root / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isreg()}
        for name in layout.files():
            member = members.get(f"{layout.folder}/{name}")
            if member is None:
                raise ConfigError(f"{archive} has no file {layout.folder}/{name}; it is not the official archive")
            partial = folder / (name + ".partial")
            with tar.extractfile(member) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            os.replace(partial, folder / name)


def _download_cifar(name: str, layout: CifarLayout, root: Path) -> Path:
    by_hand = f"pass -P data_dir=DIR holding {layout.folder}/ (extracted from {layout.url})"
    archive = root / (layout.url.rsplit("/", 1)[-1] + ".partial")
    try:
        digest = _download(lambda _: _fetch_url(layout.url, archive), root, name,
                           f"{by_hand}, or run once with internet")
        if digest != layout.md5:
            raise ConfigError(f"the {name} archive from {layout.url} has md5 {digest}, not the published "
                              f"{layout.md5}; it was deleted: run again to download it again, or {by_hand}")
        try:
            _extract_cifar(layout, archive, root)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ConfigError(f"cannot extract {layout.url} into {root}: {type(exc).__name__}: {exc}") from exc
    finally:
        archive.unlink(missing_ok=True)
    return root / layout.folder


def _load_cifar(name: str, data_dir: str):
    layout = CIFAR_LAYOUTS[name]
    root = Path(data_dir) if data_dir else DEFAULT_CACHE
    folder = _cifar_folder(layout, root) or _download_cifar(name, layout, root)
    return _read_cifar(layout, folder)


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

    ``with_indices``: batches are (images, labels, indices), the indices the images'
    rows in ``split`` (for methods that keep per-sample state, e.g. CRD's memory bank);
    the draws are the same either way.
    """

    def __new__(cls, split: Split, *args, **kwargs):
        # A streamed image folder's split holds files, not pixels: its batches stream.
        if cls is DeviceBatches and type(split.x).__name__ == "FolderImages":
            cls = StreamBatches
        return super().__new__(cls)

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, *, device,
                 shuffle: bool, augment: bool, seed: int = 0, channels_last: bool = True,
                 rank: int = 0, world_size: int = 1, with_indices: bool = False):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.info = info
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment
        self.channels_last = channels_last
        self.with_indices = with_indices
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
            rows = idx[lo:hi]
            x = self.x[rows]
            if self.augment:
                x = self._augment(x, b, lo)
            if self.with_indices:
                yield self.normalize(x), self.y[rows], rows
            else:
                yield self.normalize(x), self.y[rows]

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _augment(self, x: torch.Tensor, global_b: int | None = None, offset: int = 0) -> torch.Tensor:
        """Crop/flip ``x``, images ``offset..offset+len(x)`` of a global batch of ``global_b``:
        the draws are made for the whole global batch (the same stream on every rank)."""
        b, c, h, w = x.shape
        global_b = b if global_b is None else global_b
        shard = slice(offset, offset + b)
        if self.info.resized_crop:
            x = self._resized_crop(x, global_b, shard)
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

    def _resized_crop(self, x: torch.Tensor, global_b: int, shard: slice) -> torch.Tensor:
        """torchvision's RandomResizedCrop (area 8-100%, aspect 3/4-4/3; one draw per image,
        clamped to the image instead of torchvision's ten tries), batched: an affine
        sampling grid per image, bilinear, back to the stored size. -> float 0-255."""
        b, c, h, w = x.shape
        dev, g = self.device, self.generator

        def draw(low: float, high: float) -> torch.Tensor:
            return torch.empty(global_b, device=dev).uniform_(low, high, generator=g)[shard]

        area, log_ratio = draw(0.08, 1.0), draw(math.log(3 / 4), math.log(4 / 3))
        ratio = log_ratio.exp()
        cw, ch = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        left, top = draw(0.0, 1.0) * (1 - cw), draw(0.0, 1.0) * (1 - ch)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1] = cw, ch
        theta[:, 0, 2], theta[:, 1, 2] = 2 * left + cw - 1, 2 * top + ch - 1
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


class StreamBatches(DeviceBatches):
    """DeviceBatches of a streamed image folder (imagefolder.py: FolderImages): the same
    batches' rules (global batch, contiguous rank shards, a last partial batch, the
    generator that a checkpoint saves) with each shard decoded by DataLoader workers
    (pinned memory on CUDA) and normalised on the device. The epoch's permutation and
    every crop come from one number drawn from ``generator`` per pass, so a resumed run
    (generator state restored) streams exactly the batches it would have."""

    def __init__(self, split: Split, *args, **kwargs):
        from .imagefolder import FolderDataset, loader_workers

        super().__init__(split, *args, **kwargs)
        self.dataset = FolderDataset(split.x, self.augment)
        self.workers = loader_workers(self.world_size)

    def _shards(self, epoch_seed: int) -> tuple[list, list]:
        """-> (this rank's rows of each batch, each global batch's size)."""
        n = len(self.y)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed))
                 if self.shuffle else torch.arange(n))
        shards, sizes = [], []
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            b = len(idx)
            lo, hi = b * self.rank // self.world_size, b * (self.rank + 1) // self.world_size
            shards.append([(int(r), epoch_seed) for r in idx[lo:hi]])
            sizes.append(b)
        return shards, sizes

    def __iter__(self):
        from torch.utils.data import DataLoader

        epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator, device=self.generator.device))
        shards, sizes = self._shards(epoch_seed)
        loader = DataLoader(self.dataset, batch_sampler=shards, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if self.workers else None)
        for size, (x, rows) in zip(sizes, _one_line_errors(loader)):
            self.global_size = size
            x = x.to(self.device, non_blocking=True)
            rows = rows.to(self.device, non_blocking=True)
            if self.with_indices:
                yield self.normalize(x), self.y[rows], rows
            else:
                yield self.normalize(x), self.y[rows]


def _one_line_errors(loader):
    """``loader``'s batches; an image that became unreadable since the folder was indexed
    ends the run with one line (the last epoch's checkpoint stays for resume), not with a
    worker's traceback."""
    from .imagefolder import UnreadableImage

    try:
        yield from loader
    except UnreadableImage as exc:  # re-raised by the DataLoader with the worker's traceback in its text
        raise ConfigError(str(exc).strip().splitlines()[-1].removeprefix("kd_mlflow.imagefolder.UnreadableImage: ")
                          .removeprefix("UnreadableImage: ")) from None
