"""Checkpoints: a plain state dict plus a small metadata dict, loaded weights-only.

A checkpoint is untrusted input (it may come from a colleague, a registry or the
internet), so it is only ever read with ``torch.load(weights_only=True)``, which
refuses pickled code. Writes go to a temporary file that is renamed into place, so
a crash or a full disk never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import ConfigError

META_KEYS = ("arch", "dataset", "num_classes", "in_channels")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Write ``path`` through ``write(binary file)`` so that it is either the old file or
    the complete new one (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}; choose a writable directory") from exc
    try:
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; free space or choose another directory") from exc
        raise
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src, dst) -> Path:
    """Copy a file so that ``dst`` is either the old file or the complete new one."""
    def copy(out):
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)

    return _atomic_write(dst, copy)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _atomic_write(path, lambda f: f.write(text.encode()))


def save_model_checkpoint(path, model: torch.nn.Module, meta: dict) -> Path:
    missing = [k for k in META_KEYS if k not in meta]
    assert not missing, f"checkpoint metadata lacks {missing}"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"format": "kd-mlflow/1", "state_dict": state, "meta": dict(meta)}, path)


def load_state_dict_file(path):
    """The dict a checkpoint file holds (a kd-mlflow checkpoint or a plain state dict, e.g.
    torchvision's published weights), read weights-only. Every failure is a ConfigError
    naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"teacher checkpoint {path} does not exist; train one with "
            f"`mlflow run . -e teacher -P arch=ARCH -P output={path}` or pass another -P teacher_checkpoint"
        )
    try:
        with warnings.catch_warnings():
            # torch warns about foreign pickle protocols before refusing them; the refusal
            # below is the message that matters.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise ConfigError(
                f"{path} contains pickled code, which is refused (weights_only loading); "
                f"re-save it as a plain state dict with kd-mlflow"
            ) from exc
        raise ConfigError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {text.splitlines()[0][:100] if text else ''}); "
            f"it may be truncated or of another format: re-create it with `mlflow run . -e teacher`"
        ) from exc
    return obj


def load_model_checkpoint(path) -> tuple[dict, dict]:
    """-> (state_dict, meta). Every failure is a ConfigError naming the file and the fix."""
    path = Path(path)
    obj = load_state_dict_file(path)
    if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
        raise ConfigError(
            f"{path} is not a kd-mlflow checkpoint (no state_dict/meta); re-create it with `mlflow run . -e teacher`"
            f"{' (a torchvision state dict loads with -P teacher=tv-<its architecture>)' if isinstance(obj, dict) else ''}"
        )
    meta = obj["meta"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ConfigError(f"{path} lacks metadata {missing}; re-create it with `mlflow run . -e teacher`")
    return obj["state_dict"], meta
