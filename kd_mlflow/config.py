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
from pathlib import Path


# `kd-mlflow server` defaults: here, so that the CLI reads them without importing server.py.
DEFAULT_BACKEND_STORE_URI = "postgresql://kd_mlflow@127.0.0.1:5432/kd_mlflow"
BACKEND_ENV = "KD_SERVER_BACKEND_STORE_URI"
DEFAULT_ARTIFACTS = "./mlartifacts"


class ConfigError(ValueError):
    """Bad user input. The message names the problem and the fix, on one line."""


def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


def unwritable_reason(directory: Path, tag: str = "") -> str | None:
    """Why files cannot be created in ``directory`` (created if missing), or None: a real
    write of an empty probe file, which catches read-only mounts and permissions alike."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".kd-mlflow-write-test-{os.getpid()}{tag}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


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
    resume: str = _f("", "Continue an interrupted run from its last epoch checkpoint: its MLflow run id, "
                         "or 'auto' (the latest unfinished run here with the same settings).")
    compile: bool = _f(False, "torch.compile the student and teacher(s), on CUDA with CUDA graphs "
                              "(pays a one-off compile time).")
    nproc_per_node: int = _f(1, "Data-parallel processes on this machine (one per GPU; torchrun is started for "
                                "N > 1). batch_size stays the global batch, split across them.")
    experiment: str = _f("", "MLflow experiment (empty: the one mlflow run chose, else 'kd-mlflow').")
    registered_model: str = _f("", "Registry name; empty = <dataset>-<student>-<mode>.")
    temperature: float = _f(4.0, "Softmax temperature T of the KD term.")
    alpha: float = _f(0.9, "Weight of the KD term; CE gets 1 - alpha.")
    # --- mode-specific (see modes.py for which mode uses which, and per-mode defaults)
    teachers: str = _f("resnet14,resnet20", "allkd: comma-separated teachers (architectures, checkpoints or models:/ URIs).")
    teacher_epochs: int = _f(0, "allkd: epochs for teachers that must be trained first (0 = epochs).")
    temperatures: str = _f("1,2,4,8,16", "kdparam: comma-separated temperatures of the grid.")
    alphas: str = _f("0.1,0.5,0.7,0.9,1.0", "kdparam: comma-separated alphas of the grid.")
    ensemble: str = _f("", "multikd: comma-separated >= 2 teacher checkpoints or models:/ URIs.")
    assistants: str = _f("resnet14", "takd: comma-separated assistant architectures, teacher side first.")
    triplet_margin: float = _f(0.2, "triplet: margin of the triplet loss on L2-normalised logits.")
    triplet_weight: float = _f(1.0, "triplet: weight of the triplet term.")
    uda_weight: float = _f(1.0, "uda: weight of the consistency term.")
    uda_temperature: float = _f(0.4, "uda: sharpening temperature of the consistency target.")
    uda_threshold: float = _f(0.8, "uda: confidence below which unlabelled samples are masked out.")
    labeled_fraction: float = _f(1.0, "uda: fraction of training images that keep their labels.")
    ab_epochs: int = _f(0, "ab: epochs of activation-boundary initialisation (0 = 10% of epochs, >= 1).")
    ab_margin: float = _f(1.0, "ab: margin of the activation-boundary loss.")
    beta: float = _f(1.0, "Weight of the feature term (oh 1e-3, pkd 100, sfd 1.0).")
    rkd_distance_weight: float = _f(25.0, "rkd: weight of the distance-wise term.")
    rkd_angle_weight: float = _f(50.0, "rkd: weight of the angle-wise term.")

    # ----------------------------------------------------------------- helpers
    @classmethod
    def for_mode(cls, mode: str, **values) -> "Config":
        """A Config with the mode's own defaults (e.g. beta) under the given values."""
        from .modes import MODES

        defaults = dict(MODES[mode].defaults) if mode in MODES else {}
        return cls(mode=mode, **{**defaults, **values})

    @classmethod
    def default_for(cls, mode: str, name: str):
        from .modes import MODES

        if mode in MODES and name in MODES[mode].defaults:
            return MODES[mode].defaults[name]
        return cls.field_info(name).default

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

        # `resume` says how to run, not what: the resumed run keeps its own params.
        return {name: getattr(self, name) for name in ("mode", *MODES[self.mode].fields) if name != "resume"}

    def to_json(self) -> str:
        return json.dumps(self.params(), indent=2, sort_keys=True)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def list_of(self, name: str) -> list[str]:
        """A comma-separated list parameter as a list of non-empty, stripped items."""
        return [item.strip() for item in str(getattr(self, name)).split(",") if item.strip()]

    def floats_of(self, name: str) -> list[float]:
        try:
            return [float(v) for v in self.list_of(name)]
        except ValueError:
            raise ConfigError(
                f"{name}={getattr(self, name)!r} is not a comma-separated list of numbers; e.g. -P {name}=1,2,4"
            ) from None

    @property
    def ab_init_epochs(self) -> int:
        return self.ab_epochs or max(1, round(0.1 * self.epochs))

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
        self._validate_processes(need)
        if "temperature" in uses:
            need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        if "alpha" in uses:
            need(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        self._validate_mode_specific(uses, need)
        return self

    def _validate_processes(self, need) -> None:
        n, dev = self.nproc_per_node, self.device
        need(n >= 1, f"nproc_per_node must be >= 1, got {n}; pass -P nproc_per_node=N (1 = no torchrun)")
        if n == 1:
            return
        need(self.batch_size % n == 0,
             f"batch_size={self.batch_size} is the global batch and must split evenly over nproc_per_node={n} "
             f"processes; pass a multiple of {n}")
        need(not dev.startswith("cuda:"),
             f"device={dev} pins one GPU but nproc_per_node={n} uses one GPU per process; pass -P device=cuda")
        need(dev != "mps", f"nproc_per_node={n} runs on cpu or cuda, not mps; pass -P device=cpu")
        import torch

        if dev in ("cuda", "auto") and torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            need(n <= gpus, f"nproc_per_node={n} but this machine has {gpus} GPU(s); "
                            f"pass -P nproc_per_node={max(gpus, 1)} or -P device=cpu")

    def _validate_mode_specific(self, uses: set, need) -> None:
        from .models import ARCHITECTURES, is_known_architecture

        if "teachers" in uses:
            need(len(self.list_of("teachers")) >= 1,
                 "teachers is empty; pass -P teachers=resnet14,resnet20 (architectures, checkpoints or models:/ URIs)")
        if "teacher_epochs" in uses:
            need(self.teacher_epochs >= 0, f"teacher_epochs must be >= 0 (0 = epochs), got {self.teacher_epochs}")
        if "temperatures" in uses:
            temps = self.floats_of("temperatures")
            need(len(temps) >= 1, "temperatures is empty; e.g. -P temperatures=1,2,4,8,16")
            need(all(t > 0 for t in temps), f"every temperature must be > 0, got {self.temperatures}")
        if "alphas" in uses:
            alphas = self.floats_of("alphas")
            need(len(alphas) >= 1, "alphas is empty; e.g. -P alphas=0.1,0.5,0.9")
            need(all(0 <= a <= 1 for a in alphas), f"every alpha must be in [0, 1], got {self.alphas}")
        if "ensemble" in uses:
            need(len(self.list_of("ensemble")) >= 2,
                 f"multikd needs an ensemble of >= 2 teachers, got {len(self.list_of('ensemble'))}; "
                 f"pass -P ensemble=ckpt1.pt,ckpt2.pt (files or models:/ URIs)")
        if "assistants" in uses:
            chain = self.list_of("assistants")
            need(len(chain) >= 1, "takd needs at least one assistant; e.g. -P assistants=resnet14")
            for arch in chain:
                need(is_known_architecture(arch),
                     f"unknown assistant architecture {arch!r}; choose from: {', '.join(ARCHITECTURES)}")
        if "triplet_margin" in uses:
            need(self.triplet_margin >= 0, f"triplet_margin must be >= 0, got {self.triplet_margin}")
        for name in ("triplet_weight", "uda_weight", "beta", "rkd_distance_weight", "rkd_angle_weight"):
            if name in uses:
                need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        if "uda_temperature" in uses:
            need(self.uda_temperature > 0, f"uda_temperature must be > 0, got {self.uda_temperature}")
        if "uda_threshold" in uses:
            need(0 <= self.uda_threshold <= 1, f"uda_threshold must be in [0, 1], got {self.uda_threshold}")
        if "labeled_fraction" in uses:
            need(0 < self.labeled_fraction <= 1, f"labeled_fraction must be in (0, 1], got {self.labeled_fraction}")
        if "ab_epochs" in uses:
            need(self.ab_epochs >= 0, f"ab_epochs must be >= 0 (0 = 10% of epochs), got {self.ab_epochs}")
            need(self.ab_init_epochs < self.epochs,
                 f"ab needs more epochs ({self.epochs}) than its {self.ab_init_epochs} activation-boundary "
                 f"epochs so KD can follow; raise -P epochs or lower -P ab_epochs")
        if "ab_margin" in uses:
            need(self.ab_margin > 0, f"ab_margin must be > 0, got {self.ab_margin}")
