"""Batches on the training device: the whole split stays there as uint8 and each batch is
cropped, flipped and normalised in a few vectorised ops (DeviceBatches); an image folder too
large for memory streams from disk through DataLoader workers (StreamBatches)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .datasets import DatasetInfo
from .splits import Split


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
        last = str(exc).strip().splitlines()[-1]
        raise ConfigError(last.removeprefix(f"{UnreadableImage.__module__}.{UnreadableImage.__qualname__}: ")
                          .removeprefix(f"{UnreadableImage.__qualname__}: ")) from None
