"""Where a teacher comes from: a checkpoint file, ``pretrained:<name>``, or a
``models:/`` URI of the registry. Every check runs before data is loaded or a run is
created, so a wrong teacher costs a one-line error."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_model_checkpoint, load_state_dict_file
from ..config import Config, ConfigError
from ..data import dataset_info
from ..models import create_model
from ..models.torchvision_models import canonical, torchvision_name
from .pretrained import PRETRAINED_DIR



def teacher_source(cfg: Config, spec: str | None = None) -> str:
    """The checkpoint path or ``models:/`` URI of the run's teacher."""
    if spec is None:
        if cfg.teacher_checkpoint:
            return cfg.teacher_checkpoint
        spec = cfg.teacher
    if spec.startswith("models:/") or spec.endswith(".pt") or "/" in spec:
        return spec
    if cfg.dataset == "imagefolder":
        # pretrained/ holds teachers of the built-in datasets; "imagefolder" names no
        # particular folder, so a teacher for one is always given by its file.
        raise ConfigError(
            f"dataset=imagefolder needs the teacher's file: pass -P teacher_checkpoint=FILE (a torchvision state "
            f"dict, or a checkpoint from `mlflow run . -e teacher -P dataset=imagefolder -P data_dir=DIR "
            f"-P arch={spec.removeprefix('pretrained:')} -P output=FILE`)")
    name = spec[len("pretrained:"):] if spec.startswith("pretrained:") else f"{cfg.dataset}-{spec}"
    path = PRETRAINED_DIR / f"{name}.pt"
    if not path.is_file():
        raise ConfigError(
            f"no teacher checkpoint: {path} does not exist; train one with "
            f"`mlflow run . -e teacher -P dataset={cfg.dataset} -P arch={spec.split('-')[-1] if spec.startswith('pretrained:') else spec}` "
            f"or pass -P teacher_checkpoint=PATH"
        )
    return str(path)


def _download_registered(uri: str) -> Path:
    from ..tracking import redact, shown_registry_uri
    from ..tracking.queries import download_artifacts

    try:
        local = download_artifacts(uri)
    except Exception as exc:
        raise ConfigError(
            f"cannot fetch {uri} from the registry at {shown_registry_uri()} "
            f"({type(exc).__name__}: {redact((str(exc).splitlines() or [''])[0])[:120]}); check the name and "
            f"version with `kd-mlflow models list`"
        ) from exc
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise ConfigError(f"{uri} has no kd-mlflow checkpoint (extra_files/*.pt); register it with kd-mlflow")
    return found[0]


def load_teacher(source: str, cfg: Config):
    """-> (frozen-ready model on CPU, metadata), checked against the run's dataset."""
    path = _download_registered(source) if source.startswith("models:/") else Path(source)
    info = dataset_info(cfg)
    if torchvision_name(cfg.teacher) and not source.startswith("models:/"):
        obj = load_state_dict_file(path)
        if isinstance(obj, dict) and ("state_dict" not in obj or "meta" not in obj):  # a plain state dict
            return _torchvision_teacher(obj, source, cfg, info)
    state, meta = load_model_checkpoint(path)
    if int(meta["num_classes"]) != info.num_classes or int(meta["in_channels"]) != info.in_channels:
        raise ConfigError(
            f"teacher {source} was made for {meta['num_classes']} classes x {meta['in_channels']} channels "
            f"({meta['dataset']}), but {cfg.dataset} has {info.num_classes} x {info.in_channels}; "
            f"use a teacher trained on {cfg.dataset}"
        )
    if meta["dataset"] != cfg.dataset:
        raise ConfigError(
            f"teacher {source} was trained on {meta['dataset']}, not {cfg.dataset}; use a teacher trained on {cfg.dataset}"
        )
    try:
        model = create_model(meta["arch"], info.num_classes, info.in_channels)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"teacher {source} does not load as a {meta['arch']} ({str(exc).splitlines()[0][:120]}); "
            f"re-create it with `mlflow run . -e teacher`"
        ) from exc
    return model, meta


def _torchvision_teacher(state: dict, source: str, cfg: Config, info):
    """A torchvision network (``-P teacher=tv-<name>`` or ``torchvision:<name>``) from a plain state dict, e.g.
    torchvision's published weights: its classifier must have the dataset's classes."""
    model = create_model(cfg.teacher, info.num_classes, info.in_channels)
    net_state = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state.items()}
    key = f"{model.classifier_name}.weight"
    found = net_state.get(key)
    if found is not None and found.ndim == 2 and found.shape[0] != info.num_classes and cfg.teacher_finetune_epochs:
        # Everything but the classifier loads; the new head trains in finetune_heads.
        head = {k for k in net_state if k.startswith(model.classifier_name + ".")}
        missing, unexpected = model.net.load_state_dict({k: v for k, v in net_state.items() if k not in head},
                                                        strict=False)
        if unexpected or set(missing) != {f"{model.classifier_name}.{n}" for n, _ in
                                          model.classifier.named_parameters()}:
            raise ConfigError(f"teacher checkpoint {source} does not load as torchvision's "
                              f"{torchvision_name(cfg.teacher)} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                              f"check -P teacher")
        return model, {"arch": cfg.teacher, "dataset": cfg.dataset, "num_classes": info.num_classes,
                       "in_channels": info.in_channels, "finetune_head_from": int(found.shape[0])}
    if found is not None and found.ndim == 2 and found.shape[0] != info.num_classes:
        raise ConfigError(
            f"teacher checkpoint {source} has a {found.shape[0]}-class classifier ({key} "
            f"{found.shape[0]}x{found.shape[1]}), but {cfg.dataset} {cfg.resolved_data_dir()} has "
            f"{info.num_classes} classes; pass -P teacher_finetune_epochs=N to train a new classifier on the frozen "
            f"network first, or a checkpoint whose classifier was trained on these classes")
    try:
        model.net.load_state_dict(net_state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"teacher checkpoint {source} does not load as torchvision's {torchvision_name(cfg.teacher)} "
            f"({str(exc).splitlines()[0][:160]}); check -P teacher") from exc
    meta = {"arch": cfg.teacher, "dataset": cfg.dataset, "num_classes": info.num_classes,
            "in_channels": info.in_channels}
    return model, meta


class _HeadOnly(torch.nn.Module):
    """A network whose classifier alone trains: every other parameter frozen and every
    other module in eval mode (BatchNorm statistics untouched)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)

    def forward(self, x):
        return self.model(x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        self.model.classifier.train(mode)
        return self


def finetune_heads(cfg: Config, teachers: list, metas: list, data, tracker, rt,
                   provenance: dict | None = None) -> tuple[list, list]:
    """Teachers whose checkpoint had another number of classes (load_teacher with
    teacher_finetune_epochs) get their new classifier trained on the frozen network, on
    the run's training split, selected by validation accuracy, each in a nested run
    ``teacher-finetune`` (its epochs' metrics, then test_acc, tagged with ``provenance``,
    the runner's) -> (teachers, metas)."""
    from ..methods.base import NoKD
    from ..tracking import cleanup
    from ..trainer import Trainer, count_correct, exported_test_batches, seed_everything

    teachers, metas = list(teachers), [dict(m) for m in metas]
    for i, meta in enumerate(metas):
        if "finetune_head_from" not in meta:
            continue
        head_cfg = cfg.replace(mode="nokd", epochs=cfg.teacher_finetune_epochs, registered_model="")
        tags = {**(provenance or {}), "mode": "teacher-finetune", "parent_mode": cfg.mode,
                "stage": "teacher finetune", "dataset": cfg.dataset, "student": meta["arch"], "teacher": "none"}
        with tracker.child(f"teacher-finetune-{canonical(meta['arch'])}", tags=tags) as child:
            child.log_params({"arch": meta["arch"], "epochs": head_cfg.epochs, "lr": head_cfg.lr_used,
                              "classes_in_checkpoint": meta["finetune_head_from"], "seed": cfg.seed})
            seed_everything(cfg.seed)
            head_only = _HeadOnly(teachers[i])
            trainer = Trainer(NoKD(head_only, [], head_cfg), data, head_cfg, device=rt.device, amp_dtype=rt.amp_dtype,
                              tracker=child, workdir=cleanup.RUNS_DIR / (child.run_id or "untracked"),
                              progress_desc="teacher finetune")
            fit = trainer.fit()
            model = head_only.model.to("cpu").float().to(memory_format=torch.contiguous_format).eval()
            correct, n = count_correct(model, exported_test_batches(data))
            meta["head_finetuned_from"] = meta.pop("finetune_head_from")  # done: never twice
            meta.update({"test_acc": 100.0 * correct / n, "best_val_acc": fit.best_val_acc,
                         "mlflow_run_id": child.run_id or ""})
            child.log_metrics({"test_acc": meta["test_acc"], "best_val_acc": fit.best_val_acc},
                              step=fit.best_epoch)
        cleanup.release_workdir(child.run_id)  # its last.pt: the child is closed, FINISHED
        model.requires_grad_(False)
        teachers[i] = model
    return teachers, metas
