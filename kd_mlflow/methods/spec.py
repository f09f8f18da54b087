"""What a method declares: :class:`Mode` (name, kind, parameters, loss terms, teacher
needs, the ``module:attribute`` that implements it) and :class:`Param` (name, type,
default, help, check), with the common parameter groups and checks methods share.

No torch here: a method's declaration (``methods/<name>/__init__.py``, or an entry point
of the ``kd_mlflow.methods`` group in another package) imports only this module, so that
listing the modes (``kd-mlflow --help``, the MLproject) imports no method's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Param:
    """A parameter a mode declares next to its code (its method folder): the CLI option, the
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


def all_of(*checks):
    def check(name, value, cfg):
        return next((p for p in (c(name, value, cfg) for c in checks) if p), None)

    return check


def nonempty_list(example: str):
    return lambda name, v, cfg: None if cfg.list_of(name) else f"{name} is empty; e.g. -P {name}={example}"


def numbers(ok, rule: str):
    def check(name, v, cfg):
        values = cfg.floats_of(name)  # a ConfigError of its own when not numbers
        return None if all(ok(x) for x in values) else f"every {rule}, got {v}"

    return check


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
LS = LOGIT_STANDARDIZATION  # on every mode whose loss compares logits


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str
    kind: str  # "distiller" (one training), "teacher", or "strategy" (nested trainings)
    parameters: tuple  # in order: names of common Config fields and the mode's own Params
    target: str | None = None  # "module:attr", imported only when the mode runs
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
    # The loss terms its runs log (one metric loss_<term> each) at its default parameters.
    terms: tuple = ("ce",)
    # The parameter naming the network it trains (the teacher entry point's is arch).
    network: str = "student"
    # Where the declaration came from: "kd_mlflow" for the built-in methods, else the
    # distribution that registered it under the kd_mlflow.methods entry-point group.
    origin: str = "kd_mlflow"
    # (old name, new name) of parameters renamed since runs logged them: a config that
    # passes the old name is told the new one, and comparisons read old runs' values.
    renamed: tuple = ()

    @property
    def fields(self) -> tuple:
        """Every parameter name of the mode, in order: its MLflow params and CLI options."""
        return tuple(p if isinstance(p, str) else p.name for p in self.parameters)

    @property
    def params(self) -> tuple:
        """The mode's own parameters (the Params it declares)."""
        return tuple(p for p in self.parameters if isinstance(p, Param))

    @property
    def own_names(self) -> frozenset:
        """The names of the mode's own parameters (what a Config of the mode may hold beside
        the common fields)."""
        return frozenset(p.name for p in self.params)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def current_name(self, name: str) -> str:
        """``name`` as the mode calls it now (an old run's param may have an older name)."""
        return dict(self.renamed).get(name, name)

    def unknown_parameter(self, name: str) -> str:
        """The one-line refusal of a parameter the mode does not declare, with its new name
        when it was renamed."""
        new = dict(self.renamed).get(name)
        if new:
            return f"mode {self.name} has no parameter {name} ({name} is now {new}); pass {new} instead"
        return f"{self.name} has no parameter {name!r}; its parameters are: {', '.join(self.fields)}"

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


def kd_parameters(*extra) -> tuple:
    """The common fields with Hinton's temperature and alpha, then ``extra``."""
    return (*DATA, *PAIR, *HINTON, *extra, *OPTIM, *RUNTIME)


def feature_parameters(*extra) -> tuple:
    """The common fields with ``extra`` and no KD term."""
    return (*DATA, *PAIR, *extra, *OPTIM, *RUNTIME)
