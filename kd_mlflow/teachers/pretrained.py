"""The manifest of committed teacher checkpoints (``pretrained/manifest.json``).

Each entry says what a file is (arch, dataset, shapes), how good it is (test_acc on
the full official test split), how it was made (the exact command, seed and MLflow run)
and its sha256, so a test can verify the file and reproduce the accuracy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..checkpoint import load_model_checkpoint

PRETRAINED_DIR = Path(__file__).resolve().parents[2] / "pretrained"
MANIFEST = PRETRAINED_DIR / "manifest.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"teachers": []}


def record(checkpoint: Path, command: str) -> dict:
    """Add or replace the manifest entry of a checkpoint inside ``pretrained/``."""
    checkpoint = Path(checkpoint).resolve()
    _, meta = load_model_checkpoint(checkpoint)
    entry = {
        "file": checkpoint.name,
        "name": checkpoint.stem,
        "arch": meta["arch"], "dataset": meta["dataset"],
        "num_classes": int(meta["num_classes"]), "in_channels": int(meta["in_channels"]),
        "test_acc": float(meta["test_acc"]), "best_val_acc": float(meta.get("best_val_acc", float("nan"))),
        # test_acc as counts on the fp32 export (checkpoints from before counts were kept: absent)
        **{k: int(meta[k]) for k in ("test_correct", "test_images") if k in meta},
        "epochs": int(meta.get("epochs", 0)), "seed": int(meta.get("seed", 0)),
        "sha256": sha256_of(checkpoint), "size_bytes": checkpoint.stat().st_size,
        "command": command, "mlflow_run_id": meta.get("mlflow_run_id", ""),
    }
    manifest = read_manifest()
    manifest["teachers"] = [e for e in manifest["teachers"] if e["file"] != entry["file"]] + [entry]
    manifest["teachers"].sort(key=lambda e: e["file"])
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entry


def is_inside_pretrained(path: Path) -> bool:
    try:
        Path(path).resolve().relative_to(PRETRAINED_DIR)
        return True
    except ValueError:
        return False
