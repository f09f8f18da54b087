"""The python_function flavor of a kd-mlflow student: raw uint8 images in, class names out.

This file is copied into every logged model (``code/kd_mlflow_images.py``) and named as
its pyfunc ``loader_module``, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve``
need only torch, numpy, pandas and mlflow, not kd-mlflow. It imports nothing from
kd-mlflow: everything it needs is in the model's MLmodel metadata (``kd_mlflow``:
class names, input layout and range, normalisation).

``mlflow.pytorch.load_model`` on the same model still returns the bare network
(normalised float32 N x C x H x W in, logits out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BATCH = 256  # images per forward pass: bounded memory whatever the request size
# An image whose pixels are all <= 2 is not a raw 0-255 image: it is what images scaled to
# [0, 1] (or normalised) become after MLflow's JSON parsing casts them to the uint8 of the
# signature (0.7 -> 0). Refused, instead of a confident answer about a black image.
SCALED_MAX = 2
CENTER_CROP_FRACTION = 0.875  # torchvision's evaluation recipe: resize to 256, crop 224


def _bad_input(message: str):
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    class BadImages(MlflowException):
        """HTTP 400 whose body starts with the one line that says what is wrong: MLflow's
        scoring server sets ``message`` again to "Failed to predict data '<the whole
        request>'. Error: ..." (kilobytes of pixels first); the request is not repeated."""

        @property
        def message(self):
            return self._one_line

        @message.setter
        def message(self, value):
            if not hasattr(self, "_one_line"):
                self._one_line = value

    return BadImages(message, error_code=INVALID_PARAMETER_VALUE)


def _load_pyfunc(data_path, model_config=None):
    return ImageClassifier(Path(data_path).parent)


def _whole_pixels(images: np.ndarray) -> np.ndarray:
    """Any numeric array of raw 0-255 pixel values -> uint8; anything else refused."""
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind in "iu":
        if images.size and (images.min() < 0 or images.max() > 255):
            raise _bad_input(f"pixel values must be raw uint8 0-255; got values from {images.min()} to "
                             f"{images.max()}")
        return images.astype(np.uint8)
    if images.dtype.kind == "f":
        if images.size and not np.isfinite(images).all():
            raise _bad_input("pixel values must be raw uint8 0-255; got NaN or infinity")
        if images.size and ((images != np.round(images)).any() or images.min() < 0 or images.max() > 255):
            raise _bad_input(f"pixel values must be raw uint8 0-255, not images scaled to [0, 1] or normalised "
                             f"(the model normalises them itself); got floats from {images.min():.3g} to "
                             f"{images.max():.3g}")
        return images.astype(np.uint8)
    raise _bad_input(f"pixel values must be raw uint8 0-255; got dtype {images.dtype} (images of different "
                     "sizes go in one DataFrame column, one image per row)")


class ImageClassifier:
    """predict(uint8 images) -> DataFrame[label, class_index, probability]."""

    def __init__(self, model_dir: Path):
        import mlflow.pytorch
        import torch
        from mlflow.models import Model

        card = Model.load(str(model_dir)).metadata["kd_mlflow"]
        self.class_names = list(card["class_names"])
        self.channels = int(card["input"]["channels"])
        self.size = (int(card["input"]["height"]), int(card["input"]["width"]))
        self.mean = torch.tensor(card["normalization"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(card["normalization"]["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.resize = card.get("resize")  # image folders: {"short_side", "crop"}
        self.network = mlflow.pytorch.load_model(str(model_dir))

    def layouts(self) -> str:
        c, (h, w) = self.channels, ("H", "W") if self.resize else self.size
        if c == 1:
            return (f"N x {h} x {w}, N x 1 x {h} x {w}, N x {h} x {w} x 1, one {h} x {w} image, or a DataFrame "
                    f"with one column of images or {h * w if not self.resize else 'H*W'} pixel columns")
        extra = " (or 1 and 4: grayscale, RGBA)" if self.resize else ""
        return (f"N x {c} x {h} x {w}, N x {h} x {w} x {c}{extra}, one image ({c} x {h} x {w} or "
                f"{h} x {w} x {c}), or a DataFrame with one column of images")

    def _refuse_layout(self, shape) -> Exception:
        return _bad_input(f"images of shape {tuple(shape)} do not fit this model; send uint8 {self.layouts()}")

    def _batch(self, images: np.ndarray) -> np.ndarray:
        """One array of images in any accepted layout -> N x c x H x W (c its own channels)."""
        c, ok = self.channels, (1, 3, 4) if self.resize or self.channels == 3 else (1,)
        if images.ndim == 2:
            return images[None, None]
        if images.ndim == 3:
            if c == 1:
                if images.shape[-1] == 1 and (self.resize or images.shape[:2] == self.size):
                    return images.transpose(2, 0, 1)[None]  # one H x W x 1 image
                return images[:, None]  # N x H x W, as Fashion-MNIST stores its images
            if images.shape[0] in ok and images.shape[0] != 1:
                return images[None]  # one C x H x W image
            if images.shape[-1] in ok and images.shape[-1] != 1:
                return images.transpose(2, 0, 1)[None]  # one H x W x C image
            if self.resize:
                return images[:, None]  # N grayscale H x W images
            raise self._refuse_layout(images.shape)
        if images.ndim == 4:
            if images.shape[1] in ok:
                return images  # N x C x H x W
            if images.shape[-1] in ok:
                return images.transpose(0, 3, 1, 2)  # N x H x W x C, as PIL and numpy give images
        raise self._refuse_layout(images.shape)

    def _arrays(self, model_input) -> list:
        """The request -> a list of arrays, each a batch or one image in some layout."""
        import pandas as pd

        if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": {"image": ...}}
            model_input = next(iter(model_input.values()))
        if isinstance(model_input, pd.Series):
            model_input = model_input.to_frame()
        if not isinstance(model_input, pd.DataFrame):
            try:
                return [np.asarray(model_input)]
            except ValueError:  # ragged nested lists
                return [np.asarray(image) for image in model_input]
        frame = model_input
        if len(frame.columns) == 1 and len(frame) and np.ndim(frame.iloc[0, 0]) >= 2:
            return [np.asarray(image) for image in frame.iloc[:, 0]]  # one image per row
        if any(np.ndim(value) for value in frame.iloc[0]) if len(frame) else False:
            raise _bad_input(f"a DataFrame of {len(frame.columns)} columns holding lists: send one column "
                             f"with one image per row, or pixel columns; this model takes uint8 {self.layouts()}")
        pixels = frame.to_numpy()
        h, w = self.size
        if self.channels != 1 or self.resize or pixels.shape[1] != h * w:
            expected = f"{h * w} pixel columns (one {h} x {w} image per row, row-major)" \
                if self.channels == 1 and not self.resize else "one column with one image per row"
            raise _bad_input(f"a DataFrame of {pixels.shape[1]} scalar columns does not fit this model; send "
                             f"{expected}")
        return [pixels.reshape(len(pixels), h, w)]

    def pixels(self, model_input):
        """The uint8 N x C x H x W the network sees (before normalisation): the request's
        images in the model's layout, an image folder's resized and cropped exactly as
        its test images were for test_acc."""
        import torch

        batches = [self._batch(_whole_pixels(a)) for a in self._arrays(model_input)]
        if self.resize:
            # every image, whatever its size: one already crop x crop was still resized to
            # crop / 0.875 and centre-cropped when the run measured test_acc; grayscale and
            # RGBA become RGB as imagefolder.rgb makes a file's pixels
            from PIL import Image

            crop = int(self.resize["crop"])
            images = [center_crop(Image.fromarray(np.ascontiguousarray(img[0] if len(img) == 1 else
                                                                       img.transpose(1, 2, 0))).convert("RGB"), crop)
                      for batch in batches for img in batch]
            x = np.stack(images) if images else np.zeros((0, 3, crop, crop), np.uint8)
        else:
            for batch in batches:
                if batch.shape[1] != self.channels or batch.shape[2:] != self.size:
                    raise _bad_input(f"images of {batch.shape[1]} x {batch.shape[2]} x {batch.shape[3]} "
                                     f"(channels x height x width) do not fit this model; it takes "
                                     f"{self.channels} x {self.size[0]} x {self.size[1]}: {self.layouts()}")
            x = np.concatenate(batches) if batches else np.zeros((0, self.channels, *self.size), np.uint8)
        x = torch.from_numpy(np.array(x))  # a writable copy: requests arrive read-only
        if len(x) and (dark := (x.flatten(1).amax(dim=1) <= SCALED_MAX).nonzero().flatten()).numel():
            raise _bad_input(f"image {int(dark[0])} (and {dark.numel() - 1} more) has no pixel above "
                             f"{SCALED_MAX}: send raw pixel values 0-255, not images scaled to [0, 1] or "
                             f"normalised (the model normalises them itself)")
        return x

    def predict(self, model_input, params=None):
        import pandas as pd
        import torch

        x = self.pixels(model_input)
        probabilities = []
        with torch.no_grad():
            for start in range(0, len(x), BATCH):
                batch = (x[start:start + BATCH].float() / 255 - self.mean) / self.std
                probabilities.append(torch.softmax(self.network(batch).float(), dim=1))
        p = torch.cat(probabilities) if probabilities else torch.zeros(0, len(self.class_names))
        best, index = p.max(dim=1)
        index = index.numpy().astype(np.int64)
        return pd.DataFrame({"label": [self.class_names[i] for i in index], "class_index": index,
                             "probability": best.numpy().astype(np.float64)})


def center_crop(img, size: int) -> np.ndarray:
    """A PIL RGB image -> uint8 3 x size x size: the shorter side resized (bilinear) to
    size / CENTER_CROP_FRACTION, then the centre crop. The one transform of an image
    folder's evaluation images (imagefolder.decode) and of every image a served model
    gets, so that a served answer is the one test_acc counted."""
    from PIL import Image

    w, h = img.size
    short = max(size, round(size / CENTER_CROP_FRACTION))
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
