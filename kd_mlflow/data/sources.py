"""Where the built-in datasets' images come from: Fashion-MNIST (Debian's package, a folder,
or a download) and CIFAR-10/100 (the python pickles or the binary records), read into
uint8 arrays, with their class names and a one-line description of the source."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .datasets import DATASETS

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
