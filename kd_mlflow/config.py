"""Every hyperparameter of a run, in one validated dataclass.

The fields a mode uses (``modes.MODES[mode].fields``) are exactly the MLflow params of
its run, the options of its CLI command and the parameters of its MLproject entry
point. Validation happens here, before any data is read or any run is created, so a
typo costs a one-line error and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """Bad user input. The message names the problem and the fix, on one line."""


def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    mode: str = _f("kd", "Distillation mode.")
    dataset: str = _f("fashion_mnist", "Dataset.", ("fashion_mnist", "cifar10", "cifar100"))
    student: str = _f("resnet8", "Student architecture.")
    teacher: str = _f("resnet20", "Teacher architecture (or pretrained:<name>).")
    teacher_checkpoint: str = _f(
        "", "Teacher checkpoint: a file, or a models:/ URI; empty = pretrained/<dataset>-<teacher>.pt."
    )
    arch: str = _f("resnet20", "Architecture of the network the teacher entry point trains.")
    output: str = _f("", "Where the teacher entry point writes its checkpoint; empty = pretrained/<dataset>-<arch>.pt.")
    epochs: int = _f(10, "Training epochs.")
    batch_size: int = _f(128, "Batch size.")
    lr: float = _f(0.1, "Initial learning rate.")
    optimizer: str = _f("sgd", "Optimizer (SGD is Nesterov with momentum).", ("sgd", "adamw"))
    momentum: float = _f(0.9, "SGD momentum.")
    weight_decay: float = _f(5e-4, "Weight decay.")
    scheduler: str = _f(
        "multistep", "LR schedule: x0.1 at 1/3 and 2/3 of the epochs, cosine, or constant.",
        ("multistep", "cosine", "constant"),
    )
    seed: int = _f(0, "Seeds python, numpy, torch and the data split.")
    train_subset: int = _f(0, "Train on the first N shuffled training images (0 = all).")
    val_size: int = _f(5000, "Images carved from the training split for model selection.")
    test_subset: int = _f(0, "Evaluate test_acc on the first N test images (0 = all; for smoke tests).")
    device: str = _f("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    precision: str = _f("auto", "auto (bf16 where the device runs it fast), fp32 or bf16.", ("auto", "fp32", "bf16"))
    data_dir: str = _f("", "Dataset directory (else $KD_DATA_DIR, the Debian package, then download).")
    experiment: str = _f("", "MLflow experiment (empty: the one mlflow run chose, else 'kd-mlflow').")
    registered_model: str = _f("", "Registry name; empty = <dataset>-<student>-<mode>.")
    temperature: float = _f(4.0, "Softmax temperature T of the KD term.")
    alpha: float = _f(0.9, "Weight of the KD term; CE gets 1 - alpha.")

    # ----------------------------------------------------------------- helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_info(cls, name: str) -> dataclasses.Field:
        return {f.name: f for f in dataclasses.fields(cls)}[name]

    @property
    def network(self) -> str:
        """The architecture this run trains."""
        return self.arch if self.mode == "teacher" else self.student

    @property
    def model_name(self) -> str:
        if self.registered_model:
            return self.registered_model
        return f"{self.dataset}-{self.network}-{self.mode}"

    def params(self) -> dict:
        """What is logged as MLflow params: the fields this mode uses."""
        from .modes import MODES

        return {name: getattr(self, name) for name in ("mode", *MODES[self.mode].fields)}

    def to_json(self) -> str:
        return json.dumps(self.params(), indent=2, sort_keys=True)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def resolved_data_dir(self) -> str:
        return self.data_dir or os.environ.get("KD_DATA_DIR", "")

    # -------------------------------------------------------------- validation
    def validate(self) -> "Config":
        from .data import DATASETS
        from .models import ARCHITECTURES, is_known_architecture
        from .modes import MODES

        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        uses = set(MODES[self.mode].fields)
        if self.dataset not in DATASETS:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}"
            )
        for name in ("student", "teacher", "arch"):
            value = getattr(self, name)
            if name in uses and not value.startswith("pretrained:") and not is_known_architecture(value):
                raise ConfigError(
                    f"unknown {name} architecture {value!r}; choose one of: {', '.join(ARCHITECTURES)}"
                )

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}; pass -P epochs=N with N >= 1")
        need(self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.train_subset >= 0, f"train_subset must be >= 0 (0 = all), got {self.train_subset}")
        need(self.val_size >= 1, f"val_size must be >= 1, got {self.val_size}")
        need(self.test_subset >= 0, f"test_subset must be >= 0 (0 = all), got {self.test_subset}")
        for name in ("optimizer", "scheduler", "precision"):
            choices = self.field_info(name).metadata["choices"]
            need(getattr(self, name) in choices,
                 f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(choices)}")
        dev = self.device
        need(dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:"),
             f"unknown device {dev!r}; use auto, cpu, cuda, cuda:N or mps")
        if "temperature" in uses:
            need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        if "alpha" in uses:
            need(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        return self
