"""``dataset=imagefolder``: the user's own images, in torchvision's folder layout.

    DIR/train/<class>/*.png|jpg|...   training images, one folder per class
    DIR/test/<class>/*                 test images (test_acc only)
    DIR/val/<class>/*                  optional: the validation split; without it,
                                       val_size images are carved from train (as for
                                       the built-in datasets)

Class names are the train folder names, sorted (label i = the i-th name). Every image
is decoded once (PIL: grayscale, palette and RGBA become RGB), resized so its shorter
side is ``image_size / 0.875`` and centre-cropped to ``image_size`` (torchvision's
evaluation transform), and kept as uint8 on the training device like the built-in
datasets; training crops and flips batches there (``DatasetInfo.resized_crop``).

An image PIL cannot decode is found while the folder is read, before any run exists:
one line names the file, then it is skipped (``corrupt_images=skip``, counted in the
run's metric ``skipped_images``) or the run stops (``corrupt_images=stop``). Never a
traceback mid-epoch.

Size rule: the decoded images (N x 3 x image_size^2 bytes) are held in memory when they
take at most a quarter of this machine's RAM; a larger folder is refused with the
numbers (lower image_size or train_subset): there is no streaming path yet.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
CENTER_CROP_FRACTION = 0.875  # torchvision's evaluation recipe: resize to 256, crop 224
MEMORY_FRACTION = 0.25  # of physical RAM: the most the decoded images may take


@dataclass(frozen=True)
class Layout:
    root: Path
    classes: tuple  # sorted train folder names; label i is classes[i]
    train: tuple  # (path, label) pairs, sorted by class then file name
    test: tuple
    val: tuple | None  # None: carved from train


def _images(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _split(root: Path, name: str, classes: tuple) -> tuple:
    folder = root / name
    extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise ConfigError(f"{folder} has class folder(s) {', '.join(extra[:5])} that {root / 'train'} lacks; "
                          f"every split must use the training classes")
    return tuple((p, label) for label, c in enumerate(classes) if (folder / c).is_dir() for p in _images(folder / c))


def scan_layout(data_dir: str) -> Layout:
    """The folder's classes and image files (directory listings only, nothing decoded)."""
    if not data_dir:
        raise ConfigError("dataset=imagefolder needs -P data_dir=DIR, a folder holding train/<class>/* and "
                          "test/<class>/* (and optionally val/<class>/*)")
    root = Path(data_dir).expanduser()
    for name in ("train", "test"):
        if not (root / name).is_dir():
            raise ConfigError(f"{root} has no {name}/ folder; an image folder holds train/<class>/*.jpg, "
                              f"test/<class>/*.jpg and optionally val/<class>/*.jpg")
    classes = tuple(sorted(d.name for d in (root / "train").iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise ConfigError(f"{root / 'train'} has {len(classes)} class folder(s); a classifier needs >= 2 "
                          f"(train/<class>/<image>)")
    train = _split(root, "train", classes)
    present = {label for _, label in train}
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise ConfigError(f"class folder(s) {', '.join(empty[:5])} of {root / 'train'} hold no image "
                          f"({', '.join(IMAGE_EXTENSIONS)})")
    test = _split(root, "test", classes)
    if not test:
        raise ConfigError(f"{root / 'test'} holds no image in its class folders")
    val = _split(root, "val", classes) if (root / "val").is_dir() else None
    if val is not None and not val:
        raise ConfigError(f"{root / 'val'} holds no image in its class folders; remove it to carve the "
                          f"validation split from train (val_size)")
    return Layout(root.resolve(), classes, train, test, val)


def image_size(cfg) -> int:
    return cfg.image_size or DEFAULT_IMAGE_SIZE


def normalisation(cfg) -> tuple[tuple, tuple]:
    """(mean, std), three values each: the user's, else ImageNet's."""
    def three(name, default):
        values = cfg.floats_of(name) if getattr(cfg, name) else list(default)
        return tuple(values * 3 if len(values) == 1 else values)

    return three("mean", IMAGENET_MEAN), three("std", IMAGENET_STD)


def decode(path: Path, size: int) -> np.ndarray:
    """-> uint8 3 x size x size: RGB, shorter side resized to size / 0.875, centre crop.
    Raises whatever PIL raises for an unreadable file."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # the whole file: a truncated one fails here, not later
        if img.mode != "RGB":
            img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
        w, h = img.size
        short = max(size, round(size / CENTER_CROP_FRACTION))
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def check_fits(n_images: int, size: int, where: Path) -> None:
    need = n_images * 3 * size * size
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > MEMORY_FRACTION * total:
        raise ConfigError(
            f"{n_images} images of {where} at image_size={size} take {need / 2**30:.1f} GiB decoded, more than "
            f"{MEMORY_FRACTION:.0%} of this machine's {total / 2**30:.0f} GiB; kd-mlflow keeps image folders in "
            f"memory (no streaming yet): lower -P image_size or use -P train_subset=N")


def decode_all(files: list, size: int, policy: str) -> tuple[np.ndarray, np.ndarray, list]:
    """-> (images uint8 N x 3 x size x size, positions kept in ``files``, skipped paths)
    of ``files`` ((path, label) pairs), in order, decoded by threads (PIL releases the GIL).
    An unreadable file: one line, then skipped or a ConfigError, per ``policy``."""
    def one(item):
        try:
            return decode(item[0], size), None
        except Exception as exc:  # PIL's UnidentifiedImageError, OSError (truncated), DecompressionBombError
            return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, files, chunksize=16))
    kept, images, skipped = [], [], []
    for i, ((path, _), (image, problem)) in enumerate(zip(files, results)):
        if problem is None:
            kept.append(i)
            images.append(image)
            continue
        if policy == "stop":
            raise ConfigError(f"cannot read image {path} ({problem}); replace or delete it, or pass "
                              f"-P corrupt_images=skip to train without it")
        print(f"warning: skipping unreadable image {path} ({problem})", file=sys.stderr)
        skipped.append(str(path))
    stacked = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return stacked, np.asarray(kept, dtype=np.int64), skipped
