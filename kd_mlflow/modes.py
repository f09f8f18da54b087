"""The mode registry: the single list that the CLI, the MLproject and the runner read.

A mode names the Config fields it uses (its parameters, in order) and the code that
implements it, as a lazily imported ``module:attribute`` so that ``kd-mlflow --help``
does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace

DATA = ("dataset", "data_dir", "train_subset", "val_size", "test_subset")
OPTIM = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler")
RUNTIME = ("seed", "device", "precision", "compile", "nproc_per_node", "experiment", "registered_model")
# Where and how a run ran, not what it computed (a benchmark's resume and a comparison
# never tell runs apart by these).
EXECUTION = ("device", "precision", "compile", "nproc_per_node", "data_dir", "experiment", "registered_model")
PAIR = ("student", "teacher", "teacher_checkpoint")
HINTON = ("temperature", "alpha")


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str
    kind: str  # "distiller" (one training), "teacher", or "strategy" (nested trainings)
    fields: tuple
    target: str | None = None  # "module:attr"; None = not implemented yet
    # Where the frozen teachers come from: "teacher" (teacher/teacher_checkpoint),
    # "ensemble" (the ensemble list), or "" (none, or the strategy resolves its own).
    teacher_source: str = "teacher"
    defaults: dict = field(default_factory=dict)  # per-mode defaults that differ from Config's
    issue: str = ""

    def load(self):
        """The implementing class or function; a clear ConfigError if it does not exist yet."""
        module, attr = (self.target or ":").split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # a real missing dependency, not a missing mode
        except (AttributeError, ValueError):
            pass
        from .config import ConfigError

        raise ConfigError(f"mode {self.name!r} is not implemented yet; {self.issue or 'see the README'}")


COMMON = (*DATA, *PAIR, *OPTIM, *RUNTIME)


def _kd(*extra) -> tuple:
    return (*DATA, *PAIR, *HINTON, *extra, *OPTIM, *RUNTIME)


_ALL = [
    Mode("nokd", "Student trained with cross-entropy only (the baseline).", "distiller",
         (*DATA, *PAIR, "labeled_fraction", *OPTIM, *RUNTIME), "kd_mlflow.distillers.base:NoKD", teacher_source=""),
    Mode("kd", "Hinton et al. knowledge distillation from one frozen teacher.", "distiller",
         _kd("labeled_fraction"), "kd_mlflow.distillers.kd:HintonKD"),
    Mode("allkd", "One KD student per teacher; the best student by validation accuracy wins.", "strategy",
         (*DATA, "student", "teachers", "teacher_epochs", *HINTON, *OPTIM, *RUNTIME),
         "kd_mlflow.strategies:allkd", teacher_source=""),
    Mode("kdparam", "Grid search over KD temperature x alpha, one nested run per pair.", "strategy",
         (*DATA, *PAIR, "temperatures", "alphas", *OPTIM, *RUNTIME), "kd_mlflow.strategies:kdparam"),
    Mode("triplet", "KD plus a triplet loss on L2-normalised logits (hardest in-batch negative).", "distiller",
         _kd("triplet_margin", "triplet_weight"), "kd_mlflow.distillers.triplet:TripletKD"),
    Mode("multikd", "KD from the averaged KL to each member of a teacher ensemble.", "distiller",
         (*DATA, "student", "ensemble", *HINTON, *OPTIM, *RUNTIME), "kd_mlflow.distillers.kd:MultiTeacherKD",
         teacher_source="ensemble"),
    Mode("uda", "KD on clean and RandAugment views plus UDA consistency on unlabelled data.", "distiller",
         _kd("uda_weight", "uda_temperature", "uda_threshold", "labeled_fraction"),
         "kd_mlflow.distillers.uda:UDAKD"),
    Mode("takd", "Teacher-assistant chain: KD teacher -> assistants -> student, one nested run per link.",
         "strategy", _kd("assistants"), "kd_mlflow.strategies:takd"),
    Mode("ab", "Activation-boundary transfer on pre-ReLU stage features, then KD.", "distiller",
         _kd("ab_epochs", "ab_margin"), "kd_mlflow.distillers.ab:ActivationBoundaries"),
    Mode("oh", "Overhaul of feature distillation: pre-ReLU features, teacher-BN margins, partial L2.",
         "distiller", (*COMMON[:len(DATA) + len(PAIR)], "beta", *OPTIM, *RUNTIME),
         "kd_mlflow.distillers.oh:Overhaul", defaults={"beta": 1e-3}),
    Mode("rkd", "KD plus relational distance- and angle-wise losses on embeddings.", "distiller",
         _kd("rkd_distance_weight", "rkd_angle_weight"), "kd_mlflow.distillers.rkd:RelationalKD"),
    Mode("pkd", "KD plus patient (normalised pooled stage feature) losses.", "distiller",
         _kd("beta"), "kd_mlflow.distillers.pkd:PatientKD", defaults={"beta": 100.0}),
    Mode("sfd", "CE plus L2 between global-max-pooled student (via connector) and teacher stage features.",
         "distiller", (*COMMON[:len(DATA) + len(PAIR)], "beta", *OPTIM, *RUNTIME),
         "kd_mlflow.distillers.sfd:SimpleFeatureKD", defaults={"beta": 1.0}),
    Mode("teacher", "Train a network with cross-entropy and write a teacher checkpoint.", "teacher",
         ("dataset", "arch", "output", "data_dir", "train_subset", "val_size", "test_subset",
          *OPTIM, *RUNTIME), "kd_mlflow.distillers.base:NoKD", teacher_source=""),
]

# Single trainings can continue from their last epoch checkpoint; strategies cannot (yet).
_ALL = [m if m.kind == "strategy" else replace(m, fields=(*m.fields, "resume")) for m in _ALL]
MODES: dict[str, Mode] = {m.name: m for m in _ALL}
DISTILLATION_MODES = [m for m in MODES if m != "teacher"]
