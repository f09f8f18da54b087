"""The mode registry: the single list that the CLI, the MLproject and the runner read.

A mode names the Config fields it uses (its parameters, in order) and the code that
implements it, as a lazily imported ``module:attribute`` so that ``kd-mlflow --help``
does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

DATA = ("dataset", "data_dir", "train_subset", "val_size", "test_subset")
OPTIM = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler")
RUNTIME = ("seed", "device", "precision", "experiment", "registered_model")
PAIR = ("student", "teacher", "teacher_checkpoint")
HINTON = ("temperature", "alpha")


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str
    kind: str  # "distiller" (one training), "teacher", or "strategy" (nested trainings)
    fields: tuple
    target: str | None = None  # "module:attr"; None = not implemented yet
    needs_teacher: bool = True
    issue: str = ""

    @property
    def implemented(self) -> bool:
        return self.target is not None

    def load(self):
        if self.target is None:
            from .config import ConfigError

            raise ConfigError(
                f"mode {self.name!r} is not implemented yet ({self.issue}); "
                f"implemented modes: {', '.join(m.name for m in MODES.values() if m.implemented)}"
            )
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


def _pending(name: str, summary: str, kind: str = "distiller") -> Mode:
    return Mode(name, summary, kind, (*DATA, *PAIR, *HINTON, *OPTIM, *RUNTIME),
                issue="tracked in the 'all thirteen distillation modes' issue")


_ALL = [
    Mode("nokd", "Student trained with cross-entropy only (the baseline).", "distiller",
         (*DATA, *PAIR, *OPTIM, *RUNTIME), "kd_mlflow.distillers.base:NoKD", needs_teacher=False),
    Mode("kd", "Hinton et al. knowledge distillation from one frozen teacher.", "distiller",
         (*DATA, *PAIR, *HINTON, *OPTIM, *RUNTIME), "kd_mlflow.distillers.kd:HintonKD"),
    _pending("allkd", "One KD student per teacher; the best student by validation accuracy wins.", "strategy"),
    _pending("kdparam", "Grid search over KD temperature x alpha.", "strategy"),
    _pending("triplet", "KD plus a triplet loss on normalised logits."),
    _pending("multikd", "KD from the averaged KL of an ensemble of teachers."),
    _pending("uda", "KD plus unsupervised data augmentation consistency."),
    _pending("takd", "Teacher-assistant chain of KD trainings.", "strategy"),
    _pending("ab", "Activation-boundary transfer, then KD."),
    _pending("oh", "Overhaul of feature distillation (pre-ReLU, margin, partial L2)."),
    _pending("rkd", "KD plus relational (distance and angle) losses."),
    _pending("pkd", "KD plus patient (normalised stage feature) losses."),
    _pending("sfd", "CE plus L2 between max-pooled stage features."),
    Mode("teacher", "Train a network with cross-entropy and write a teacher checkpoint.", "teacher",
         ("dataset", "arch", "output", "data_dir", "train_subset", "val_size", "test_subset",
          *OPTIM, *RUNTIME), "kd_mlflow.distillers.base:NoKD", needs_teacher=False),
]

MODES: dict[str, Mode] = {m.name: m for m in _ALL}
DISTILLATION_MODES = [m for m in MODES if m != "teacher"]
