"""Strong augmentation (RandAugment) of whole batches on their device, for UDA.

torchvision's ``v2.RandAugment`` accepts a uint8 (..., 1 or 3, H, W) batch, but draws its
ops once per call, so one call would give every image of the batch the same two ops.
Calling it once per image gives full diversity but costs ~60-160 ms per 128 images on a
2-core CPU (256 calls on tiny tensors). The batch is therefore split into ``chunks``
slices (default 8) that each draw their own ops and signs: ~6-14 ms per 128 images on
that CPU (about 1-2% of a UDA step there), with 8 independent op pairs per batch; the
batches are reshuffled every epoch, so an image meets different draws and neighbours. Every op works per image
within a slice (contrast/equalize/autocontrast use that image's own statistics).

The random draws come from torch's global generator (torchvision samples there); the
trainer seeds it, so a run is reproducible on one device.
"""

from __future__ import annotations

import functools

import torch
from torchvision.transforms import v2

DEFAULT_CHUNKS = 8


@functools.lru_cache(maxsize=None)
def _rand_augment(num_ops: int, magnitude: int) -> v2.RandAugment:
    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)


def rand_augment(images: torch.Tensor, *, num_ops: int = 2, magnitude: int = 9,
                 chunks: int = DEFAULT_CHUNKS) -> torch.Tensor:
    """RandAugment a uint8 (B, C, H, W) batch (C = 1 or 3) on its device; each of
    ``chunks`` contiguous slices of the batch gets its own random ops. -> uint8, same shape."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"rand_augment expects a uint8 (B, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] == 0:
        return images
    op = _rand_augment(num_ops, magnitude)
    return torch.cat([op(part) for part in images.chunk(max(1, min(chunks, images.shape[0])))])


def to_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Undo ``(u - mean) / std`` normalisation (mean, std in 0-255 pixel units, broadcastable
    as (1, C, 1, 1)). Exact for images that were uint8 before normalisation."""
    return (x.float() * std + mean).round_().clamp_(0, 255).to(torch.uint8)


def normalize(u: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (u.float() - mean) / std


def strong_augment(x: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                   **kwargs) -> torch.Tensor:
    """RandAugment a batch given either as uint8 (returned as uint8) or as normalised floats
    (give ``mean`` and ``std`` in 0-255 pixel units; returned normalised, in the input's
    memory format). Keyword arguments go to :func:`rand_augment`."""
    if x.dtype == torch.uint8:
        return rand_augment(x, **kwargs)
    if mean is None or std is None:
        raise ValueError("strong_augment of normalised images needs the normalisation mean and std")
    out = normalize(rand_augment(to_uint8(x, mean, std), **kwargs), mean, std)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
