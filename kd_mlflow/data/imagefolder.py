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

Size rule (``streams``): the decoded images (N x 3 x image_size^2 bytes, all splits) are
held in memory when they take at most a quarter of this machine's RAM (and of the GPU's
memory on CUDA); a larger folder streams from disk through DataLoader workers (see
"streaming" below). ``data_loading=memory|stream`` forces either.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..tracking.pyfunc_images import CENTER_CROP_FRACTION, center_crop  # noqa: F401 (the serving transform, shared)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
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


def rgb(img):
    """A PIL image as RGB: grayscale replicated, palette and alpha images through RGBA
    (their transparency resolved by the palette), alpha dropped."""
    if img.mode == "RGB":
        return img
    return img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")


def decode(path: Path, size: int) -> np.ndarray:
    """-> uint8 3 x size x size: RGB, shorter side resized to size / 0.875, centre crop.
    Raises whatever PIL raises for an unreadable file."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # the whole file: a truncated one fails here, not later
        return center_crop(rgb(img), size)


def memory_limit(device: str) -> tuple[int, str]:
    """-> (bytes the decoded images may take in memory, what that limit is): a quarter of
    this machine's RAM, and of the GPU's memory when the run may use one (the in-memory
    splits live on the training device)."""
    limit, what = None, ""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit, what = int(MEMORY_FRACTION * total), f"{MEMORY_FRACTION:.0%} of {total / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    if device != "cpu" and device != "mps" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        gpu = torch.cuda.get_device_properties(index).total_memory
        if limit is None or MEMORY_FRACTION * gpu < limit:
            limit, what = int(MEMORY_FRACTION * gpu), f"{MEMORY_FRACTION:.0%} of the GPU's {gpu / 2**30:.0f} GiB"
    return (limit if limit is not None else 2**62), what


def streams(cfg, n_images: int, size: int, where: Path) -> bool:
    """The rule that picks how an image folder is read: in memory when its decoded images
    (N x 3 x size^2 bytes) fit in memory_limit, else streamed (data_loading=auto);
    data_loading=memory or stream forces one (memory refuses what does not fit)."""
    need = n_images * 3 * size * size
    limit, what = memory_limit(cfg.device)
    if cfg.data_loading == "stream":
        return True
    fits = need <= limit
    if cfg.data_loading == "memory" and not fits:
        raise ConfigError(
            f"{n_images} images of {where} at image_size={size} take {need / 2**30:.1f} GiB decoded, more than "
            f"{what}; lower -P image_size, use -P train_subset=N, or stream them: -P data_loading=auto")
    return not fits


def _problem(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def _each(function, files: list) -> list:
    """``function(path)`` for each (path, label) of ``files``, in order, on threads (PIL
    releases the GIL while it decodes)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda item: function(item[0]), files, chunksize=16))


def _keep_readable(files: list, problems: list, policy: str) -> tuple[list, list]:
    """-> (positions of the files without a problem, skipped paths): one line per
    unreadable file, then skipped, or a ConfigError (``policy`` stop)."""
    kept, skipped = [], []
    for i, ((path, _), problem) in enumerate(zip(files, problems)):
        if problem is None:
            kept.append(i)
        elif policy == "stop":
            raise ConfigError(f"cannot read image {path} ({problem}); replace or delete it, or pass "
                              f"-P corrupt_images=skip to train without it")
        else:
            print(f"warning: skipping unreadable image {path} ({problem})", file=sys.stderr)
            skipped.append(str(path))
    return kept, skipped


def decode_all(files: list, size: int, policy: str) -> tuple[np.ndarray, list, list]:
    """-> (images uint8 N x 3 x size x size, positions kept in ``files``, skipped paths)
    of ``files`` ((path, label) pairs), in order."""
    def one(path):
        try:
            return decode(path, size), None
        except Exception as exc:  # PIL's UnidentifiedImageError, OSError (truncated), DecompressionBombError
            return None, _problem(exc)

    results = _each(one, files)
    kept, skipped = _keep_readable(files, [problem for _, problem in results], policy)
    images = [results[i][0] for i in kept]
    stacked = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return stacked, kept, skipped


# ------------------------------------------------------------------ streaming
# A folder whose decoded images do not fit in memory (or data_loading=stream) streams:
# its splits hold FolderImages (the files) instead of pixels, and DeviceBatches built on
# such a split is a StreamBatches (batches.py), which decodes each batch in DataLoader
# workers. What decides a training batch is the same as in memory: a permutation drawn
# from the batches' generator (saved in every epoch checkpoint, so a resumed run draws
# the next epoch's exact order and crops), a global batch of batch_size split into
# contiguous per-rank shards (what torch's DistributedSampler does with a stride; a
# contiguous shard keeps "the N shards concatenated are the one-process batch"), and
# each image's crop and flip drawn from (epoch seed, image), whichever worker decodes it.
def check_readable(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or None; cheaper than decoding it: a JPEG is
    decoded at 1/8 scale (every byte read, no full-size IDCT), other formats are
    verified (PNG: every chunk's CRC)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
            else:
                img.verify()
        return None
    except Exception as exc:
        return _problem(exc)


def readable_files(files: list, policy: str) -> tuple[list, list]:
    """-> (positions in ``files`` of the readable ones, skipped paths), by check_readable."""
    return _keep_readable(files, _each(check_readable, files), policy)


class FolderImages:
    """The images of a streamed split: its files, decoded when a batch asks for them.
    Reads like the uint8 N x 3 x S x S tensor of an in-memory split where the code
    around batches needs it: ``x[:n]`` decodes n images (the logged model's example),
    ``x[index_tensor]`` is the subset (a labelled subset), and ``detach()`` is a digest of
    the files (the teacher cache's key of a batch stream)."""

    dtype = torch.uint8

    def __init__(self, paths: tuple, size: int):
        self.paths = tuple(str(p) for p in paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple:
        return (len(self.paths), 3, self.size, self.size)

    def to(self, device) -> "FolderImages":
        return self  # files stay files; their batches go to the device

    def stride(self) -> tuple:
        s = self.size
        return (3 * s * s, s * s, s, 1)

    def __getitem__(self, key):
        if isinstance(key, slice):
            images = [decode(Path(p), self.size) for p in self.paths[key]]
            return torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, self.size, self.size,
                                                                                   dtype=torch.uint8)
        index = np.asarray(key.cpu() if hasattr(key, "cpu") else key).reshape(-1)
        return FolderImages(tuple(self.paths[int(i)] for i in index), self.size)

    def detach(self):
        import hashlib

        h = hashlib.sha256(f"{self.size}|".encode())
        for p in self.paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def _train_view(path: str, size: int, seed: tuple):
    """uint8 3 x size x size: torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3,
    ten tries, then the centre crop) and a horizontal flip, on the whole image, drawn from
    ``seed`` = (epoch seed, image position), so the view does not depend on which worker
    makes it."""
    import math as m

    from PIL import Image

    rng = np.random.default_rng(seed)
    with Image.open(path) as img:
        img = rgb(img)
        w, h = img.size
        area = w * h
        box = None
        for _ in range(10):
            target = area * rng.uniform(0.08, 1.0)
            ratio = m.exp(rng.uniform(m.log(3 / 4), m.log(4 / 3)))
            cw, ch = int(round(m.sqrt(target * ratio))), int(round(m.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (left, top, left + cw, top + ch)
                break
        if box is None:  # torchvision's fallback: the central crop at the nearest allowed ratio
            ratio = w / h
            cw, ch = (w, int(round(w / (4 / 3)))) if ratio > 4 / 3 else (int(round(h * 3 / 4)), h) \
                if ratio < 3 / 4 else (w, h)
            box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        view = img.resize((size, size), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(view, dtype=np.uint8).transpose(2, 0, 1).copy()


class UnreadableImage(RuntimeError):
    """A streamed image that decoded when the folder was indexed and fails now. Raised in
    a DataLoader worker; StreamBatches turns it into the one-line ConfigError."""


class FolderDataset:
    """A map-style dataset over FolderImages for a DataLoader: item (image, epoch seed) ->
    (uint8 image, position). Training views are random crops seeded by (epoch seed,
    position); evaluation views are ``decode``'s resize + centre crop."""

    def __init__(self, images: FolderImages, augment: bool):
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        row, epoch_seed = item
        path = self.images.paths[row]
        try:
            pixels = (_train_view(path, self.images.size, (epoch_seed, row)) if self.augment
                      else decode(Path(path), self.images.size))
        except Exception as exc:
            # check_readable passed it when the folder was read: a file changed or broke since.
            raise UnreadableImage(f"cannot read image {path} ({_problem(exc)}); it was readable when the folder "
                                  f"was indexed: replace it and resume the run (-P resume=auto)") from None
        return torch.from_numpy(pixels), row


def loader_workers(world_size: int = 1) -> int:
    """DataLoader worker processes per rank: KD_DATA_WORKERS, else the cores of this
    machine shared by its ranks, one left for the training process, 1 to 8."""
    forced = os.environ.get("KD_DATA_WORKERS", "")
    if forced.isdigit():
        return int(forced)
    return max(1, min(8, (os.cpu_count() or 2) // max(1, world_size) - 1))
