"""Every committed teacher is what its manifest says: same bytes (sha256), loads as its
architecture, and reproduces its stated test accuracy on the full real test split."""

from __future__ import annotations

import pytest
import torch

from kd_mlflow.config import Config
from kd_mlflow.data import DATASETS, DeviceBatches, Split, load_arrays
from kd_mlflow.teachers.pretrained import PRETRAINED_DIR, read_manifest, sha256_of
from kd_mlflow.teachers import load_teacher, teacher_source
from kd_mlflow.trainer import count_correct

ENTRIES = read_manifest()["teachers"]


def test_manifest_lists_every_committed_checkpoint():
    on_disk = sorted(p.name for p in PRETRAINED_DIR.glob("*.pt"))
    assert on_disk == sorted(e["file"] for e in ENTRIES)
    assert any(e["dataset"] == "fashion_mnist" and e["test_acc"] >= 93.0 for e in ENTRIES), \
        "a Fashion-MNIST teacher with >= 93% test accuracy is committed"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_teacher_matches_its_manifest(entry):
    path = PRETRAINED_DIR / entry["file"]
    assert sha256_of(path) == entry["sha256"]
    assert path.stat().st_size < 8 * 2**20, "keep committed weights small"
    cfg = Config.for_mode("kd", dataset=entry["dataset"], teacher=f"pretrained:{entry['name']}")
    model, meta = load_teacher(teacher_source(cfg), cfg)
    assert meta["arch"] == entry["arch"]
    info = DATASETS[entry["dataset"]]
    _, _, test_x, test_y = load_arrays(entry["dataset"])
    split = Split(torch.from_numpy(test_x.copy()), torch.from_numpy(test_y.astype("int64")))
    # counted as the registry counts test_acc: the fp32 model in eval mode, contiguous, on CPU
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    correct, n = count_correct(model, DeviceBatches(split, info, 500, device="cpu", shuffle=False, augment=False,
                                                    channels_last=False))
    expected = entry.get("test_correct", round(entry["test_acc"] * n / 100))
    assert (correct, n) == (expected, entry.get("test_images", n))
    assert "kd-mlflow" in entry["command"] or "entry_points/run.py" in entry["command"]
