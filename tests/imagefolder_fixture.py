"""An image folder the tests make themselves (no download): 5 classes of small PNG and
JPEG images, each class a colour with noise, in mixed sizes and modes (RGB, grayscale,
RGBA, palette), and one corrupt file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("apple", "banana", "cherry", "grape", "lemon")
COLOURS = ((200, 40, 40), (230, 210, 60), (120, 0, 40), (90, 40, 140), (250, 250, 120))
CORRUPT = Path("train") / "cherry" / "broken.jpg"


def make_image_folder(root: Path, train_per_class: int = 50, test_per_class: int = 10, val_per_class: int = 0,
                      corrupt: bool = True, seed: int = 0) -> Path:
    """root/{train,test[,val]}/<class>/*.png|jpg -> root. 5 x (train + test + val) images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = {"train": train_per_class, "test": test_per_class, "val": val_per_class}
    for split, count in splits.items():
        for c, (name, colour) in enumerate(zip(CLASSES, COLOURS)):
            if not count:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                kind = i % 5
                if kind == 1:
                    image = image.convert("L")
                elif kind == 2:
                    image = image.convert("RGBA")
                elif kind == 3:
                    image = image.convert("P")
                if kind == 4:
                    image.save(folder / f"{split}_{c}_{i}.jpg", quality=90)
                else:
                    image.save(folder / f"{split}_{c}_{i}.png")
    if corrupt:
        (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(range(256)))
    return root
