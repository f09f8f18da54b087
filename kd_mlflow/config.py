"""Every hyperparameter of a run, in one validated dataclass.

``Config`` holds the fields common to all modes; each mode declares its own parameters
as :class:`Param` in its method folder (kd_mlflow/methods/<name>/), and they are read as attributes
all the same (``cfg.temperature``). The names a mode uses (``modes.MODES[mode].fields``:
the common ones it takes, then its own) are exactly the MLflow params of its run, the
options of its CLI command and the parameters of its MLproject entry point. Validation
happens here, before any data is read or any run is created, so a typo costs a
one-line error and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError  # here too: `from .config import ConfigError` is how most modules import it
from .modes import Param, above, at_least, within  # noqa: F401  (declared beside the registry; re-exported)


RECIPE_LR = {"sgd": 0.1, "adamw": 1e-3}  # lr=0: the optimizer's usual initial rate

# `kd-mlflow server` defaults: here, so that the CLI reads them without importing server.py.
DEFAULT_BACKEND_STORE_URI = "postgresql://kd_mlflow@127.0.0.1:5432/kd_mlflow"
BACKEND_ENV = "KD_SERVER_BACKEND_STORE_URI"
DEFAULT_ARTIFACTS = "./mlartifacts"


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
    dataset: str = _f("fashion_mnist", "Dataset (imagefolder: your own images under data_dir, see docs/data.md).",
                      ("fashion_mnist", "cifar10", "cifar100", "imagefolder"))
    student: str = _f("resnet8", "Student architecture.")
    teacher: str = _f("resnet20", "Teacher architecture (or pretrained:<name>).")
    teacher_checkpoint: str = _f(
        "", "Teacher checkpoint: a file, or a models:/ URI; empty = pretrained/<dataset>-<teacher>.pt."
    )
    teacher_finetune_epochs: int = _f(
        0, "When the teacher checkpoint's classifier has another number of classes than the dataset: epochs of "
           "training a new classifier on the frozen network (a nested run teacher-finetune) before distillation; "
           "0 = refuse such a checkpoint.")
    epochs: int = _f(10, "Training epochs.")
    batch_size: int = _f(128, "Batch size.")
    lr: float = _f(0.0, "Initial learning rate; 0 = the optimizer's recipe (SGD 0.1, AdamW 0.001).")
    optimizer: str = _f("auto", "Optimizer: SGD (Nesterov with momentum) or AdamW; auto = the network family's "
                                "recipe: SGD for the CIFAR-style resnet/wrn, AdamW for torchvision networks (tv-*).",
                        ("auto", "sgd", "adamw"))
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
    data_dir: str = _f("", "Dataset directory (else $KD_DATA_DIR, the Debian package, then download); for "
                           "imagefolder the folder holding train/<class>/*, test/<class>/* and optionally val/.")
    image_size: int = _f(0, "imagefolder: side of the square training images (0 = 224); the built-in datasets "
                            "keep their native size.")
    mean: str = _f("", "imagefolder: comma-separated per-channel mean (0-1) for normalisation; empty = ImageNet's.")
    std: str = _f("", "imagefolder: comma-separated per-channel std (0-1) for normalisation; empty = ImageNet's.")
    corrupt_images: str = _f("skip", "imagefolder: an unreadable image is skipped with a one-line warning (counted "
                                     "in the metric skipped_images), or stops the run before training.",
                             ("skip", "stop"))
    data_loading: str = _f("auto", "imagefolder: auto keeps the decoded images in memory when they take at most a "
                                   "quarter of RAM (and of GPU memory on CUDA), else streams them from disk through "
                                   "DataLoader workers; memory or stream forces one.", ("auto", "memory", "stream"))
    resume: str = _f("", "Continue an interrupted run from its last epoch checkpoint: its MLflow run id, "
                         "or 'auto' (the latest unfinished run here with the same settings).")
    compile: bool = _f(False, "torch.compile the student and teacher(s), on CUDA with CUDA graphs "
                              "(pays a one-off compile time).")
    system_metrics: bool = _f(True, "Log CPU, memory, disk and network use (and GPU use where pynvml sees "
                                    "a GPU) as MLflow system metrics every 10 s; rank 0 only.")
    teacher_cache: bool = _f(True, "Compute a frozen teacher's logits once per batch stream and reuse them in the "
                                   "trainings of one process that see the same batches (kdparam's grid, allkd, "
                                   "a benchmark's modes of one seed); bit-identical results. false = the teacher "
                                   "runs in every training.")
    threads: int = _f(0, "CPU threads of this run's math (torch intra-op threads); 0 = this machine's physical "
                         "cores (shared out among nproc_per_node processes). A CPU run's numbers depend on it "
                         "(reductions are split across threads), so no other setting or path changes it.")
    nproc_per_node: int = _f(1, "Data-parallel processes on this machine (one per GPU; torchrun is started for "
                                "N > 1). batch_size stays the global batch, split across them.")
    experiment: str = _f("", "MLflow experiment (empty: the one mlflow run chose, else 'kd-mlflow').")
    registered_model: str = _f("", "Registry name; empty = <dataset>-<student>-<mode>.")
    # Each mode declares its own parameters (its method folder): they live in ``method`` and read
    # as attributes, cfg.temperature like cfg.epochs.
    method: dict = field(default_factory=dict, repr=False, metadata={"help": "", "choices": None})

    # ----------------------------------------------------------------- helpers
    @classmethod
    def for_mode(cls, mode: str, **values) -> "Config":
        """A Config with the mode's own parameter defaults (e.g. pkd_weight) under the given values."""
        from .modes import MODES

        defaults = {p.name: p.default for p in MODES[mode].params} if mode in MODES else {}
        return cls(mode=mode, **{**defaults, **values})

    @classmethod
    def taken_by(cls, mode: str, values: dict) -> dict:
        """The ``values`` that ``mode`` takes (common fields and its own parameters): a
        multi-run command's options (benchmark, sweep, tune) apply to the modes that have
        them, e.g. ``teachers`` to allkd only."""
        from .modes import MODES

        own = MODES[mode].own_names if mode in MODES else frozenset()
        return {k: v for k, v in values.items() if k in COMMON_FIELDS or k in own}

    @classmethod
    def default_for(cls, mode: str, name: str):
        return cls.parameter(name, mode).default

    @classmethod
    def parameter(cls, name: str, mode: str | None = None) -> "Param":
        """The declaration of ``name``: the mode's own Param, a common field as a Param, or
        (no mode, or a name the mode lacks) the first mode's that declares it."""
        from .modes import declared_parameter

        common = {f.name: f for f in dataclasses.fields(cls) if f.name != "method"}
        if name in common:
            f = common[name]
            return Param(name, f.type, f.default, f.metadata["help"], choices=f.metadata["choices"])
        found = declared_parameter(name, mode)
        if found is None:
            raise KeyError(name)
        return found

    def __post_init__(self):
        from .modes import declared_parameter

        unknown = [k for k in self.method if declared_parameter(k) is None]
        if unknown:  # a typo in a parameter name fails here, not at the first forward pass
            raise TypeError(f"Config got unknown parameter(s): {', '.join(unknown)}")

    def __getattr__(self, name: str):
        # Only reached for names that are not common fields: a mode's own parameters. A
        # parameter the mode does not declare has no value here (not another mode's default).
        from .modes import MODES

        if name.startswith("__") or name == "method":
            raise AttributeError(name)
        method = self.__dict__.get("method", {})
        if name in method:
            return method[name]
        mode = self.__dict__.get("mode")
        own = MODES[mode].param(name) if mode in MODES else None
        if own is not None:
            return own.default
        raise AttributeError(f"mode {mode!r} has no parameter {name!r}")

    @property
    def network(self) -> str:
        """The architecture this run trains."""
        from .modes import MODES

        return getattr(self, MODES[self.mode].network if self.mode in MODES else "student")

    @property
    def optimizer_used(self) -> str:
        """``optimizer``, auto resolved by the trained network's family: torchvision's
        ImageNet networks diverge under SGD at lr 0.1 on a small folder (tv-resnet18 on 1,437
        digits, 3 epochs: 18.3% test against 84.4% with AdamW at 0.001); the CIFAR-style
        networks keep the SGD recipe every benchmark ran with."""
        if self.optimizer != "auto":
            return self.optimizer
        return "adamw" if self.network.startswith(("tv-", "torchvision:")) else "sgd"

    @property
    def lr_used(self) -> float:
        """``lr``, or (0) the resolved optimizer's recipe rate."""
        return self.lr if self.lr > 0 else RECIPE_LR[self.optimizer_used]

    @property
    def smoke(self) -> str:
        """'' for a run on the whole dataset; else the subsets that make it a smoke run
        (e.g. 'train_subset=500'), which is not registered unless registered_model asks."""
        return ", ".join(f"{name}={getattr(self, name)}" for name in ("train_subset", "test_subset")
                         if getattr(self, name))

    @property
    def registers(self) -> bool:
        """Whether this run's student goes to the registry: a smoke run only when
        registered_model names it (a strategy's stages and teachers follow the strategy's)."""
        return not self.smoke or bool(self.registered_model)

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

    def resolved_data_dir(self) -> str:
        return self.data_dir or os.environ.get("KD_DATA_DIR", "")

    # -------------------------------------------------------------- validation
    def validate(self) -> "Config":
        from .data.datasets import DATASETS
        from .models import ARCHITECTURES, is_known_architecture
        from .models.torchvision_models import torchvision_name
        from .modes import MODES

        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        uses = set(MODES[self.mode].fields)
        if self.dataset not in DATASETS and self.dataset != "imagefolder":
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}, imagefolder"
            )
        self._validate_images()
        for name in ("student", "teacher", "arch"):
            if name not in uses:
                continue
            value = getattr(self, name)
            if not value.startswith("pretrained:") and not is_known_architecture(value):
                raise ConfigError(
                    f"unknown {name} architecture {value!r}; choose one of: {', '.join(ARCHITECTURES)}"
                )
            if name in uses and name != "teacher" and value.startswith("torchvision:"):
                # The network trained here names its MLflow model, and model names refuse ':'.
                raise ConfigError(f"{name}={value}: write {name}=tv-{value[len('torchvision:'):]} (the name "
                                  f"becomes part of MLflow model names, which cannot contain ':')")
            if name in uses and torchvision_name(value) and self.dataset in DATASETS \
                    and DATASETS[self.dataset].in_channels != 3:
                raise ConfigError(f"{name}={value}: torchvision architectures take 3-channel images and "
                                  f"{self.dataset} has {DATASETS[self.dataset].in_channels}; use cifar10, cifar100 "
                                  f"or imagefolder")

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.teacher_finetune_epochs >= 0,
             f"teacher_finetune_epochs must be >= 0 (0 = off), got {self.teacher_finetune_epochs}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}; pass -P epochs=N with N >= 1")
        need(self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        need(self.lr >= 0, f"lr must be > 0 (or 0 = the optimizer's recipe), got {self.lr}")
        need(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.train_subset >= 0, f"train_subset must be >= 0 (0 = all), got {self.train_subset}")
        need(self.val_size >= 1, f"val_size must be >= 1, got {self.val_size}")
        need(self.test_subset >= 0, f"test_subset must be >= 0 (0 = all), got {self.test_subset}")
        need(self.threads >= 0, f"threads must be >= 0 (0 = this machine's physical cores), got {self.threads}")
        for name in ("optimizer", "scheduler", "precision"):
            choices = self.parameter(name).choices
            need(getattr(self, name) in choices,
                 f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(choices)}")
        dev = self.device
        need(dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:"),
             f"unknown device {dev!r}; use auto, cpu, cuda, cuda:N or mps")
        self._validate_processes(need)
        for param in MODES[self.mode].params:
            problem = param.check(param.name, getattr(self, param.name), self) if param.check else None
            need(problem is None, problem or "")
        if self.experiment:  # under `mlflow run`: refused before any work if the run is elsewhere
            from .tracking import check_launcher_experiment

            check_launcher_experiment(self.experiment)
        return self
    def _validate_images(self) -> None:
        """image_size, mean, std and corrupt_images: what they may be, and the image folder's
        layout (cheap: directories only), before anything is decoded."""
        for name in ("corrupt_images", "data_loading"):
            choices = self.parameter(name).choices
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(choices)}")
        if self.dataset != "imagefolder":
            for name, unset in (("image_size", 0), ("mean", ""), ("std", ""), ("data_loading", "auto")):
                if getattr(self, name) != unset:
                    raise ConfigError(f"{name} applies to dataset=imagefolder only; {self.dataset} keeps its "
                                      f"native size and statistics (drop -P {name})")
            return
        if self.image_size != 0 and self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16 (0 = 224), got {self.image_size}")
        for name in ("mean", "std"):
            if getattr(self, name):
                values = self.floats_of(name)
                if len(values) not in (1, 3) or (name == "std" and min(values) <= 0):
                    raise ConfigError(f"{name}={getattr(self, name)!r} must be 1 or 3 comma-separated numbers"
                                      f"{' > 0' if name == 'std' else ''}, e.g. -P {name}="
                                      f"{'0.485,0.456,0.406' if name == 'mean' else '0.229,0.224,0.225'}")
        from .data.imagefolder import scan_layout

        scan_layout(self.resolved_data_dir())  # a ConfigError naming what is missing

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


COMMON_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "method")
_dataclass_init = Config.__init__


def _config_init(self, mode: str = "kd", method: dict | None = None, **values) -> None:
    """Common fields as dataclass fields; every other keyword is one of the mode's own
    parameters and goes into ``method``; a name the mode does not declare is refused in one
    line that names the mode's parameters. ``method`` is what dataclasses.replace passes
    back in: a replace(mode=...) keeps the parameters the new mode declares (a kdparam
    run's kd stages keep temperature and alpha, not the grid)."""
    from .modes import MODES

    common = {k: v for k, v in values.items() if k in COMMON_FIELDS}
    given = {k: v for k, v in values.items() if k not in COMMON_FIELDS}
    if mode in MODES:
        declared = MODES[mode].own_names
        unknown = sorted(set(given) - declared)
        if unknown:
            from .modes import modes_taking

            renamed = dict(MODES[mode].renamed)
            where = "; ".join([f"{k} is now {renamed[k]}" for k in unknown if k in renamed]
                              + [f"{k} belongs to {', '.join(modes_taking(k))}" for k in unknown
                                 if k not in renamed and modes_taking(k)])
            raise ConfigError(f"mode {mode} has no parameter {', '.join(unknown)}"
                              + (f" ({where})" if where else "")
                              + f"; its own parameters: {', '.join(sorted(declared)) or 'none'} "
                              f"(and the common ones: `kd-mlflow train {mode} --help`)")
        method = {k: v for k, v in (method or {}).items() if k in declared}
    _dataclass_init(self, mode=mode, method={**(method or {}), **given}, **common)


Config.__init__ = _config_init
