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


def make_glyph_folder(root: Path, train_per_class: int = 100, test_per_class: int = 20, size: int = 32,
                      seed: int = 0) -> Path:
    """root/{train,test}/<digit>/*.png -> root: 10 classes of class-structured images, like a
    user's own small folder (scikit-learn's digits, say): the digit drawn in PIL's scalable
    default font, at a random size, position and rotation, light on dark in a random tint, with noise."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # light strokes on a dark ground, as scanned digits are stored, each tinted
                ink, paper = rng.integers(170, 256) - rng.integers(0, 40, 3), rng.integers(0, 70) + rng.integers(0, 30, 3)
                image = Image.new("RGB", (size, size), tuple(int(c) for c in paper))
                font = ImageFont.load_default(size=float(rng.uniform(0.55, 0.85) * size))
                draw = ImageDraw.Draw(image)
                left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
                x = (size - (right - left)) / 2 - left + rng.uniform(-3, 3)
                y = (size - (bottom - top)) / 2 - top + rng.uniform(-3, 3)
                draw.text((x, y), str(digit), font=font, fill=tuple(int(c) for c in ink))
                image = image.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR,
                                     fillcolor=tuple(int(c) for c in paper))
                pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 12, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{split}_{digit}_{i}.png")
    return root
