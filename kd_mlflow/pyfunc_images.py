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

    def predict(self, model_input, params=None):
        import pandas as pd
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
        if self.resize and len(x) and tuple(x.shape[-2:]) != (self.resize["crop"],) * 2:
            x = _resize_center_crop(x, self.resize["short_side"], self.resize["crop"])
        if len(x) and (dark := (x.flatten(1).amax(dim=1) <= SCALED_MAX).nonzero().flatten()).numel():
            raise _bad_input(f"image {int(dark[0])} (and {dark.numel() - 1} more) has no pixel above "
                             f"{SCALED_MAX}: send raw pixel values 0-255, not images scaled to [0, 1] or "
                             f"normalised (the model normalises them itself)")
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


def _resize_center_crop(x, short_side: int, crop: int):
    """uint8 N x C x H x W -> N x C x crop x crop: shorter side to ``short_side`` (bilinear,
    antialiased), centre crop; how an image folder's test images were prepared."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    scale = short_side / min(h, w)
    nh, nw = max(short_side, round(h * scale)), max(short_side, round(w * scale))
    y = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return y[..., top:top + crop, left:left + crop].round().clamp(0, 255).to(torch.uint8)
