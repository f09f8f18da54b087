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

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400 when served


def _load_pyfunc(data_path, model_config=None):
    return ImageClassifier(Path(data_path).parent)


class ImageClassifier:
    """predict(uint8 images) -> DataFrame[label, class_index, probability]."""

    def __init__(self, model_dir: Path):
        import mlflow.pytorch
        import torch
        from mlflow.models import Model

        card = Model.load(str(model_dir)).metadata["kd_mlflow"]
        self.class_names = list(card["class_names"])
        self.channels = int(card["input"]["channels"])
        self.mean = torch.tensor(card["normalization"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(card["normalization"]["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.resize = card.get("resize")  # image folders: {"short_side", "crop"}
        self.network = mlflow.pytorch.load_model(str(model_dir))

    def pixels(self, model_input):
        """The uint8 N x C x H x W the network sees (before normalisation): the request's
        images in the model's layout, an image folder's resized and cropped exactly as
        its test images were for test_acc."""
        import torch

        images = np.asarray(model_input)
        if images.dtype != np.uint8:  # the signature refuses this first; kept for direct calls
            raise _bad_input(f"expected raw uint8 images (0-255), got dtype {images.dtype}")
        x = torch.from_numpy(np.array(images))  # a writable copy: requests arrive read-only
        if x.ndim == 3 and self.channels == 1:
            x = x.unsqueeze(1)  # N x H x W, as Fashion-MNIST stores its images
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise _bad_input(f"expected uint8 images N x H x W (one channel) or N x {self.channels} x H x W, "
                             f"got shape {tuple(images.shape)}")
        if self.resize and len(x):
            # every image, whatever its size: one already crop x crop was still resized to
            # crop / 0.875 and centre-cropped when the run measured test_acc
            from PIL import Image

            crop = int(self.resize["crop"])
            x = torch.from_numpy(np.stack([center_crop(Image.fromarray(img.permute(1, 2, 0).numpy()), crop)
                                           for img in x]))
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
