"""Unsupervised Data Augmentation (Xie et al., 2020) adapted to knowledge distillation.

Per step, on a labelled batch x_l and an unlabelled batch x_u of the same size:

* ``ce``        (1 - alpha) * CE(s(x_l), y)
* ``kd``        alpha * hinton_kd(s(x_l), t(x_l))
* ``kd_strong`` alpha * hinton_kd(s(aug(x_l)), t(aug(x_l)))   (aug = RandAugment)
* ``uda``       uda_weight * consistency(x_u)

The unlabelled pool is the whole training split (labels never read); with
``labeled_fraction < 1`` only a seeded subset keeps its labels (see ``adapt_data``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...data.augment import strong_augment
from ...data import DeviceBatches
from ..base import Distiller
from ..logits import hinton_kd_loss


def uda_consistency_loss(clean_logits: torch.Tensor, strong_logits: torch.Tensor, temperature: float,
                         threshold: float) -> torch.Tensor:
    """sum_i mask_i * KL(sharpen(p(x_i)) || p(aug(x_i))) / B.

    target = softmax(clean/temperature), computed without autograd (a constant);
    prediction = log_softmax(strong); KL summed over classes per sample;
    mask_i = max_c softmax(clean_i)_c >= threshold, on the clean *unsharpened* prediction.

    The masked sum is divided by the batch size B, not by the number of kept samples
    (as UDA's image code does: the mean over all samples with masked ones counted as 0).
    The term then grows with the fraction of confident samples, a built-in warm-up:
    early in training, when few predictions pass the threshold, a handful of samples
    cannot dominate the step as they would if divided by the mask count.
    """
    with torch.no_grad():
        clean = clean_logits.detach().float()
        log_target = F.log_softmax(clean / temperature, dim=1)
        mask = (F.softmax(clean, dim=1).amax(dim=1) >= threshold).float()
    log_pred = F.log_softmax(strong_logits.float(), dim=1)
    per_sample = F.kl_div(log_pred, log_target, reduction="none", log_target=True).sum(dim=1)
    return (per_sample * mask).sum() / clean_logits.shape[0]


class UnlabeledStream:
    """Endless unlabelled batches, pass after pass (each pass reshuffles with the batches'
    own generator), at a position a checkpoint can hold: the generator state at the start
    of the current pass and the number of batches taken from it. Restoring replays those
    batches (their order and crops are redrawn; a pass is cheap next to a training step),
    so a resumed run meets exactly the batches an uninterrupted one would."""

    def __init__(self, batches: DeviceBatches):
        self.batches = batches
        self._pass_start = batches.generator.get_state()
        self._taken = 0
        self._pass = None  # the current pass's iterator; None until its first batch

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._pass is None:
            self._pass_start, self._taken = self.batches.generator.get_state(), 0
            self._pass = iter(self.batches)
        try:
            x, _ = next(self._pass)
        except StopIteration:
            self._pass = None
            return next(self)
        self._taken += 1
        return x

    def state(self) -> dict:
        return {"pass_start": self._pass_start.clone(), "taken": self._taken}

    def load_state(self, state: dict) -> None:
        self.batches.generator.set_state(state["pass_start"])
        self._pass_start, self._taken = state["pass_start"].clone(), 0
        self._pass = iter(self.batches)
        for _ in range(state["taken"]):
            next(self)


class UDAKD(Distiller):
    """Hinton KD on clean and strongly augmented labelled images plus UDA consistency.

    The student runs once per step on the concatenation [x_l, aug(x_l), x_u, aug(x_u)]
    (as UDA's reference does): every view is normalised by the same BatchNorm batch
    statistics, so the clean x_u prediction that becomes the target is produced by the
    very network state the aug(x_u) prediction is compared under. The target and mask are
    taken from the detached x_u logits under no_grad, so no gradient flows into them.
    The teacher (eval mode, running BN statistics) runs once on [x_l, aug(x_l)].
    """

    def __init__(self, student, teachers=(), cfg=None):
        super().__init__(student, teachers, cfg)
        self._unlabeled: UnlabeledStream | None = None  # normalised unlabelled batches, endless
        self._mean = self._std = None  # normalisation in pixel units, for RandAugment

    def on_fit_start(self, trainer) -> None:
        data, cfg = trainer.data, trainer.cfg
        pool = data.unlabeled
        if pool is None:
            if cfg.labeled_fraction < 1:
                raise RuntimeError("UDAKD.adapt_data was not applied: the data has no unlabelled split")
            pool = data.train
        batches = DeviceBatches(pool, data.info, cfg.batch_size, device=trainer.device,
                                shuffle=True, augment=True, seed=cfg.seed + 1,
                                rank=trainer.train_batches.rank, world_size=trainer.train_batches.world_size)
        if len(batches) == 0:
            raise ValueError(f"the unlabelled pool has {len(pool)} image(s); UDA needs at least 2")
        self._unlabeled = UnlabeledStream(batches)
        self._mean, self._std = trainer.train_batches.mean, trainer.train_batches.std

    # RandAugment draws from torch's global generator, which the trainer checkpoints itself.
    def checkpoint_extra(self) -> dict:
        return {"unlabeled": self._unlabeled.state()} if self._unlabeled is not None else {}

    def load_checkpoint_extra(self, extra: dict) -> None:
        if "unlabeled" in extra:
            self._unlabeled.load_state(extra["unlabeled"])

    def _strong(self, x: torch.Tensor) -> torch.Tensor:
        return strong_augment(x, self._mean, self._std)

    def forward(self, x, y):
        if self._unlabeled is None:
            raise RuntimeError("UDAKD needs on_fit_start(trainer) before its first step (the Trainer calls it)")
        cfg = self.cfg
        b = x.shape[0]
        x_u = next(self._unlabeled)[:b]
        bu = x_u.shape[0]
        x_strong = self._strong(x)
        x_u_strong = self._strong(x_u)

        t_logits = self.teacher_logits(torch.cat([x, x_strong]))
        s_logits = self.student(torch.cat([x, x_strong, x_u, x_u_strong]))
        s_clean, s_strong, s_u, s_u_strong = torch.split(s_logits, [b, b, bu, bu])
        t_clean, t_strong = t_logits[:b], t_logits[b:]

        a, temp, ls = cfg.alpha, cfg.temperature, cfg.logit_standardization
        return s_clean, {
            "ce": (1 - a) * F.cross_entropy(s_clean.float(), y),
            "kd": a * hinton_kd_loss(s_clean, t_clean, temp, ls),
            "kd_strong": a * hinton_kd_loss(s_strong, t_strong, temp, ls),
            "uda": cfg.uda_weight * uda_consistency_loss(s_u, s_u_strong, cfg.uda_temperature, cfg.uda_threshold),
        }
