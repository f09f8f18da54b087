"""The mode registry: the single list that the CLI, the MLproject and the runner read.

A mode lists the common Config fields it takes and declares its own parameters
(:class:`Param`: name, type, default, help, check) in its entry, next
to the code that implements it, a lazily imported ``module:attribute`` so that
``kd-mlflow --help`` does not import torch. Adding a method = its file in distillers/,
its entry here, its test; the CLI, the MLproject (``kd-mlflow mlproject``), validation
and the logged params follow from the entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Param:
    """A parameter a mode declares next to its code (modes.py): the CLI option, the
    MLproject parameter, the validation and the logged MLflow param all come from it.

    ``type`` is "int", "float", "str" or "bool"; ``check(name, value, cfg)`` returns the
    one-line problem (what is wrong and how to fix it) or None."""

    name: str
    type: str
    default: object
    help: str
    check: Callable | None = None
    choices: tuple | None = None

    def but(self, **changes) -> "Param":
        """The same parameter with another default (or help) for one mode."""
        return replace(self, **changes)


# Checks for Param.check, each a one-line message in the shape users already know.
def at_least(low, note: str = ""):
    return lambda name, v, cfg: None if v >= low else f"{name} must be >= {low}{note}, got {v}"


def above(low):
    return lambda name, v, cfg: None if v > low else f"{name} must be > {low}, got {v}"


def within(low, high, open_low: bool = False):
    def check(name, v, cfg):
        inside = (low < v if open_low else low <= v) and v <= high
        return None if inside else f"{name} must be in {'(' if open_low else '['}{low}, {high}], got {v}"

    return check


IMAGES = ("image_size", "mean", "std", "corrupt_images", "data_loading")  # what imagefolder's images become (config.py)
DATA = ("dataset", "data_dir", *IMAGES, "train_subset", "val_size", "test_subset")
OPTIM = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler")
RUNTIME = ("seed", "device", "precision", "threads", "compile", "system_metrics", "teacher_cache", "nproc_per_node",
           "experiment", "registered_model")
# Where and how a run ran, not what it computed (a benchmark's resume and a comparison
# never tell runs apart by these).
EXECUTION = ("device", "precision", "compile", "system_metrics", "teacher_cache", "nproc_per_node", "data_dir",
             "experiment", "registered_model")
PAIR = ("student", "teacher", "teacher_checkpoint", "teacher_finetune_epochs")


def _all(*checks):
    def check(name, value, cfg):
        return next((p for p in (c(name, value, cfg) for c in checks) if p), None)

    return check


def _nonempty_list(example: str):
    return lambda name, v, cfg: None if cfg.list_of(name) else f"{name} is empty; e.g. -P {name}={example}"


def _numbers(ok, rule: str):
    def check(name, v, cfg):
        values = cfg.floats_of(name)  # a ConfigError of its own when not numbers
        return None if all(ok(x) for x in values) else f"every {rule}, got {v}"

    return check


def _architectures(name, v, cfg):
    from .models import ARCHITECTURES, is_known_architecture

    chain = cfg.list_of(name)
    if not chain:
        return "takd needs at least one assistant; e.g. -P assistants=resnet14"
    bad = next((a for a in chain if not is_known_architecture(a)), None)
    return None if bad is None else f"unknown assistant architecture {bad!r}; choose from: {', '.join(ARCHITECTURES)}"


def _ab_epochs(name, v, cfg):
    if v < 0:
        return f"ab_epochs must be >= 0 (0 = 10% of epochs), got {v}"
    if cfg.ab_init_epochs >= cfg.epochs:
        return (f"ab needs more epochs ({cfg.epochs}) than its {cfg.ab_init_epochs} activation-boundary "
                f"epochs so KD can follow; raise -P epochs or lower -P ab_epochs")
    return None


# ------------------------------------------------------- parameters several modes share
TEMPERATURE = Param("temperature", "float", 4.0, "Softmax temperature T of the KD term.", above(0))
ALPHA = Param("alpha", "float", 0.9, "Weight of the KD term; CE gets 1 - alpha.", within(0, 1))
HINTON = (TEMPERATURE, ALPHA)
LOGIT_STANDARDIZATION = Param(
    "logit_standardization", "bool", False,
    "Z-score each sample's teacher and student logits (mean 0, sample std 1) before the temperature "
    "(Sun et al., CVPR 2024).")
LABELED_FRACTION = Param("labeled_fraction", "float", 1.0, "uda: fraction of training images that keep their labels.",
                         within(0, 1, open_low=True))
BETA = Param("beta", "float", 1.0, "Weight of the feature term (oh 1e-3, pkd 10, sfd 0.3).", at_least(0))


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str
    kind: str  # "distiller" (one training), "teacher", or "strategy" (nested trainings)
    parameters: tuple  # in order: names of common Config fields and the mode's own Params
    target: str | None = None  # "module:attr"
    # Where the frozen teachers come from: "teacher" (teacher/teacher_checkpoint),
    # "ensemble" (the ensemble list), or "" (none, or the strategy resolves its own).
    teacher_source: str = "teacher"
    # cfg -> the run's `teacher` tag, for a mode whose teachers are not the ones loaded
    # from teacher_source (a strategy that resolves its own); None: the loaded ones' archs.
    teacher_tag: Callable | None = None
    # The mode every other one is compared against (compare's gain, the figures).
    baseline: bool = False
    # (list parameter, note): a parameter without a usable default; a benchmark leaves
    # the mode out, with the note, when it is not given.
    needs: tuple = ()

    @property
    def fields(self) -> tuple:
        """Every parameter name of the mode, in order: its MLflow params and CLI options."""
        return tuple(p if isinstance(p, str) else p.name for p in self.parameters)

    @property
    def params(self) -> tuple:
        """The mode's own parameters (the Params it declares)."""
        return tuple(p for p in self.parameters if isinstance(p, Param))

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def load(self):
        """The implementing class or function; a clear ConfigError if it does not exist."""
        module, attr = (self.target or ":").split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # a real missing dependency, not a missing mode
        except (AttributeError, ValueError):
            pass
        raise ConfigError(f"mode {self.name!r} has no implementation at {self.target}")


COMMON = (*DATA, *PAIR, *OPTIM, *RUNTIME)


def _kd(*extra) -> tuple:
    return (*DATA, *PAIR, *HINTON, *extra, *OPTIM, *RUNTIME)


def _features(*extra) -> tuple:
    return (*DATA, *PAIR, *extra, *OPTIM, *RUNTIME)


LS = LOGIT_STANDARDIZATION  # on every mode whose loss compares logits

_ALL = [
    Mode("nokd", "Student trained with cross-entropy only (the baseline).", "distiller",
         (*DATA, *PAIR, LABELED_FRACTION, *OPTIM, *RUNTIME), "kd_mlflow.distillers.base:NoKD", teacher_source="",
         baseline=True),
    Mode("kd", "Hinton et al. knowledge distillation from one frozen teacher.", "distiller",
         _kd(LABELED_FRACTION, LS), "kd_mlflow.distillers.kd:HintonKD"),
    Mode("allkd", "One KD student per teacher; the best student by validation accuracy wins.", "strategy",
         (*DATA, "student",
          Param("teachers", "str", "resnet14,resnet20",
                "allkd: comma-separated teachers (architectures, checkpoints or models:/ URIs).",
                lambda name, v, cfg: None if cfg.list_of(name) else
                "teachers is empty; pass -P teachers=resnet14,resnet20 (architectures, checkpoints or models:/ URIs)"),
          Param("teacher_epochs", "int", 0, "allkd: epochs for teachers that must be trained first (0 = epochs).",
                at_least(0, " (0 = epochs)")),
          *HINTON, LS, *OPTIM, *RUNTIME),
         "kd_mlflow.strategies:allkd", teacher_source="", teacher_tag=lambda cfg: ",".join(cfg.list_of("teachers"))),
    Mode("kdparam", "Grid search over KD temperature x alpha, one nested run per pair.", "strategy",
         (*DATA, *PAIR,
          Param("temperatures", "str", "1,2,4,8,16", "kdparam: comma-separated temperatures of the grid.",
                _all(_nonempty_list("1,2,4,8,16"), _numbers(lambda t: t > 0, "temperature must be > 0"))),
          Param("alphas", "str", "0.1,0.5,0.7,0.9,1.0", "kdparam: comma-separated alphas of the grid.",
                _all(_nonempty_list("0.1,0.5,0.9"), _numbers(lambda a: 0 <= a <= 1, "alpha must be in [0, 1]"))),
          LS, *OPTIM, *RUNTIME), "kd_mlflow.strategies:kdparam"),
    Mode("triplet", "KD plus a triplet loss on L2-normalised logits (hardest in-batch negative).", "distiller",
         _kd(Param("triplet_margin", "float", 0.2, "triplet: margin of the triplet loss on L2-normalised logits.",
                   at_least(0)),
             Param("triplet_weight", "float", 1.0, "triplet: weight of the triplet term.", at_least(0)), LS),
         "kd_mlflow.distillers.triplet:TripletKD"),
    Mode("multikd", "KD from the averaged KL to each member of a teacher ensemble.", "distiller",
         (*DATA, "student",
          Param("ensemble", "str", "", "multikd: comma-separated >= 2 teacher checkpoints or models:/ URIs.",
                lambda name, v, cfg: None if len(cfg.list_of(name)) >= 2 else
                f"multikd needs an ensemble of >= 2 teachers, got {len(cfg.list_of(name))}; "
                f"pass -P ensemble=ckpt1.pt,ckpt2.pt (files or models:/ URIs)"),
          *HINTON, LS, *OPTIM, *RUNTIME), "kd_mlflow.distillers.kd:MultiTeacherKD", teacher_source="ensemble",
         needs=("ensemble", "it needs an ensemble of >= 2 teachers; pass -P ensemble=ckpt1.pt,ckpt2.pt "
                            "(files or models:/ URIs) to include it")),
    Mode("uda", "KD on clean and RandAugment views plus UDA consistency on unlabelled data.", "distiller",
         _kd(Param("uda_weight", "float", 1.0, "uda: weight of the consistency term.", at_least(0)),
             Param("uda_temperature", "float", 0.4, "uda: sharpening temperature of the consistency target.",
                   above(0)),
             Param("uda_threshold", "float", 0.8,
                   "uda: confidence below which unlabelled samples are masked out.", within(0, 1)),
             LABELED_FRACTION, LS),
         "kd_mlflow.distillers.uda:UDAKD"),
    Mode("takd", "Teacher-assistant chain: KD teacher -> assistants -> student, one nested run per link.",
         "strategy",
         _kd(Param("assistants", "str", "resnet14", "takd: comma-separated assistant architectures, teacher side first.",
                   _architectures), LS),
         "kd_mlflow.strategies:takd"),
    Mode("ab", "Activation-boundary transfer on pre-ReLU stage features, then KD.", "distiller",
         _kd(Param("ab_epochs", "int", 0, "ab: epochs of activation-boundary initialisation (0 = 10% of epochs, >= 1).",
                   _ab_epochs),
             Param("ab_margin", "float", 1.0, "ab: margin of the activation-boundary loss.", above(0))),
         "kd_mlflow.distillers.ab:ActivationBoundaries"),
    Mode("oh", "Overhaul of feature distillation: pre-ReLU features, teacher-BN margins, partial L2.",
         "distiller", _features(BETA.but(default=1e-3)), "kd_mlflow.distillers.oh:Overhaul"),
    Mode("rkd", "KD plus relational distance- and angle-wise losses on embeddings.", "distiller",
         _kd(Param("rkd_distance_weight", "float", 25.0, "rkd: weight of the distance-wise term.", at_least(0)),
             # 0, not the paper's 50: the recorded sweep and a 5-seed check (docs/benchmark/).
             Param("rkd_angle_weight", "float", 0.0, "rkd: weight of the angle-wise term (0: distance only, "
                   "RKD-D; the paper's RKD-DA uses 50).", at_least(0))),
         "kd_mlflow.distillers.rkd:RelationalKD"),
    Mode("pkd", "KD plus patient (normalised pooled stage feature) losses.", "distiller",
         _kd(BETA.but(default=10.0)), "kd_mlflow.distillers.pkd:PatientKD"),
    Mode("sfd", "CE plus L2 between global-max-pooled student (via connector) and teacher stage features.",
         "distiller", _features(BETA.but(default=0.3)), "kd_mlflow.distillers.sfd:SimpleFeatureKD"),
    Mode("dkd", "Decoupled KD: CE plus target-class and non-target-class KD, separately weighted, warmed up.",
         "distiller",
         (*DATA, *PAIR, TEMPERATURE,
          Param("dkd_alpha", "float", 1.0, "dkd: weight of TCKD (target-class KD).", at_least(0)),
          Param("dkd_beta", "float", 8.0, "dkd: weight of NCKD (non-target-class KD).", at_least(0)),
          Param("dkd_warmup", "int", 20, "dkd: epochs of linear warm-up of the DKD terms (scaled to the run "
                                         "when longer; 0 = none).", at_least(0)),
          LS, *OPTIM, *RUNTIME),
         "kd_mlflow.distillers.dkd:DecoupledKD"),
    Mode("dist", "DIST: CE plus inter- and intra-class Pearson-correlation relations of the probabilities.",
         "distiller",
         # T 2, not the paper's CIFAR 4: chosen by the recorded sweep (docs/benchmark/).
         (*DATA, *PAIR, TEMPERATURE.but(default=2.0),
          Param("dist_beta", "float", 2.0, "dist: weight of the inter-class relation term.", at_least(0)),
          Param("dist_gamma", "float", 2.0, "dist: weight of the intra-class relation term.", at_least(0)),
          LS, *OPTIM, *RUNTIME),
         "kd_mlflow.distillers.dist:DIST"),
    Mode("crd", "CRD: CE plus KD plus contrastive representation distillation against a memory bank.",
         "distiller",
         (*DATA, *PAIR, TEMPERATURE,
          Param("crd_weight", "float", 0.8, "crd: weight of the contrastive (NCE) term.", at_least(0)),
          Param("crd_kd_weight", "float", 1.0, "crd: weight of the KD term (CE has weight 1; 0 = CRD alone).",
                at_least(0)),
          Param("crd_negatives", "int", 16384, "crd: negatives per anchor, images of other classes (capped at "
                                              "what the training split has, with a warning).", at_least(1)),
          Param("crd_temperature", "float", 0.07, "crd: temperature of the contrastive scores.", above(0)),
          Param("crd_dim", "int", 128, "crd: dimension of the projected, L2-normalised embeddings.", at_least(1)),
          Param("crd_momentum", "float", 0.5, "crd: momentum of the memory-bank update.",
                lambda name, v, cfg: None if 0 <= v < 1 else f"{name} must be in [0, 1), got {v}"),
          *OPTIM, *RUNTIME),
         "kd_mlflow.distillers.crd:CRD"),
    Mode("teacher", "Train a network with cross-entropy and write a teacher checkpoint.", "teacher",
         ("dataset",
          Param("arch", "str", "resnet20", "Architecture of the network the teacher entry point trains."),
          Param("output", "str", "",
                "Where the teacher entry point writes its checkpoint; empty = pretrained/<dataset>-<arch>.pt."),
          "data_dir", *IMAGES, "train_subset", "val_size", "test_subset", *OPTIM, *RUNTIME),
         "kd_mlflow.distillers.base:NoKD", teacher_source=""),
]

# Single trainings can continue from their last epoch checkpoint; strategies cannot (yet).
_ALL = [m if m.kind == "strategy" else replace(m, parameters=(*m.parameters, "resume")) for m in _ALL]
MODES: dict[str, Mode] = {m.name: m for m in _ALL}
DISTILLATION_MODES = [m for m in MODES if m != "teacher"]
BASELINE = next(m.name for m in _ALL if m.baseline)


def declared_parameter(name: str, mode: str | None = None) -> Param | None:
    """The Param ``mode`` declares as ``name``; else the first mode's of that name (a
    parameter read on a mode that lacks it takes that default); None if no mode has it."""
    if mode in MODES and MODES[mode].param(name) is not None:
        return MODES[mode].param(name)
    return next((m.param(name) for m in MODES.values() if m.param(name) is not None), None)


def modes_taking(name: str) -> list[str]:
    return [m.name for m in MODES.values() if name in m.fields]
