from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def labeled_subset_size(n: int, fraction: float) -> int:
    return min(n, max(2, round(fraction * n)))


def labeled_subset(data, fraction: float, seed: int):
    """-> ``data`` whose train split is round(fraction * N) images (>= 2) drawn with a
    generator seeded by ``seed`` (the same images for every mode of one seed, so nokd, kd
    and uda can be compared on the same labels), and whose unlabelled pool is the whole
    training split; fraction 1.0 keeps the training split as it is."""
    from ..data import DataBundle, Split

    n = len(data.train)
    k = labeled_subset_size(n, fraction)
    train, indices = data.train, data.indices
    if k < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
        train = Split(data.train.x[idx], data.train.y[idx])
        if indices is not None:
            indices = {**indices, "train": indices["train"][idx.numpy()]}
    return DataBundle(data.info, train, data.val, data.test, unlabeled=data.train, indices=indices,
                      source=data.source)


class Distiller(nn.Module):
    """Student + frozen teacher(s) + trainable connectors.

    ``forward(x, y)`` returns ``(student_logits, {term: loss})``; the trainer sums the
    terms. Teachers never train: their parameters are frozen, ``train()`` keeps them in
    eval mode (BN statistics untouched), and their forward runs without autograd.
    """

    # True when some trainable parameters get no gradient in some steps (data-parallel
    # training must then look for them every step; see distributed.wrap).
    leaves_parameters_unused = False
    # True when the method keeps per-sample state (CRD's memory bank): the trainer then
    # calls forward(x, y, index=rows), rows the images' positions in data.train (each
    # rank's share of them when sharded); other methods' batches are left as they are.
    wants_indices = False
    # A teacher_cache.Stream while a training runs inside a teacher-cache session (the
    # runner attaches it); None: the teachers run on every batch.
    teacher_cache = None

    def __init__(self, student: nn.Module, teachers=(), cfg=None):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.cfg = cfg
        for t in self.teachers:
            t.requires_grad_(False)
            t.eval()

    # Hooks a method may override (all optional):
    #   adapt_data(data, cfg) -> DataBundle   classmethod, before training (e.g. UDA's
    #                                          labelled subset + unlabelled pool)
    #   on_fit_start(trainer)                  once, with the trainer's device and batches
    #   on_epoch_start(epoch)                  before each epoch (e.g. AB's two phases)
    #   checkpoint_extra() -> dict             state beyond parameters and buffers that an
    #   load_checkpoint_extra(extra)           exact resume needs (e.g. UDA's unlabelled stream);
    #                                          saved in every epoch checkpoint, given back
    #                                          after on_fit_start when a run resumes
    @classmethod
    def adapt_data(cls, data, cfg):
        """The semi-supervised setting, for every mode that takes ``labeled_fraction``:
        train on its labelled subset; the whole training split is the unlabelled pool."""
        fraction = getattr(cfg, "labeled_fraction", None)  # None: the mode does not declare it
        if fraction is None:
            return data
        return labeled_subset(data, fraction, cfg.seed)

    def on_fit_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        """Plain tensors and Python values only: checkpoints are loaded weights-only."""
        return {}

    def load_checkpoint_extra(self, extra: dict) -> None:
        pass

    @property
    def teacher(self) -> nn.Module:
        return self.teachers[0]

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def trainable_parameters(self):
        frozen = {id(p) for p in self.teachers.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen and p.requires_grad]

    def trainable_state_dict(self) -> dict:
        """Student and connectors (what a resume needs); teachers are reloaded from their files."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teachers.")}

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor, index: int = 0, embedding: bool = False):
        """-> (logits, pooled penultimate embedding or None) of teacher ``index`` on ``x``.
        Within a teacher-cache session (kdparam, allkd, a benchmark) they are read from
        the cache when an earlier training ran the same teacher on this very batch of
        the same data stream (teachers/cache.py says when); else the teacher runs."""
        if self.teacher_cache is not None:
            return self.teacher_cache.outputs(index, self.teachers[index], x, embedding)
        teacher = self.teachers[index]
        if embedding:
            f = teacher.features(x)
            return f.logits, f.embedding
        return teacher(x), None

    def teacher_logits(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.teacher_outputs(x, index)[0]

    def forward(self, x: torch.Tensor, y: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError


class NoKD(Distiller):
    """Cross-entropy only: the baseline every distillation mode is compared against."""

    def forward(self, x, y):
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y)}
