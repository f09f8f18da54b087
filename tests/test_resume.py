"""Faults survived: a run killed mid-training (SIGKILL: no chance to clean up; SIGTERM:
marked KILLED) continues from its last epoch checkpoint in the same MLflow run and, on
CPU, ends with exactly the numbers of an uninterrupted run. Real processes, real signals.

uda is checked besides the baseline: it draws from random streams of its own (the
unlabelled batches' order and crops, RandAugment's ops), which its checkpoint must carry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sqlite_store

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--train-subset", "1000", "--val-size", "300", "--test-subset", "300", "--batch-size", "100",
        "--epochs", "3", "--device", "cpu", "--experiment", "resume"]
# With half the images labelled, an epoch (5 batches) ends in the middle of a pass over the
# unlabelled pool (10 batches): the resumed stream must continue there.
MODE_ARGS = {"nokd": [], "uda": ["--teacher", "pretrained:fashion_mnist-resnet20", "--labeled-fraction", "0.5"]}


def _env(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": sqlite_store(tmp_path),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _train(tmp_path, *extra, mode="nokd", wait=True):
    cmd = [sys.executable, "-m", "kd_mlflow", "train", mode, *ARGS, *MODE_ARGS[mode], *extra]
    if wait:
        return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _interrupt_after_first_epoch(tmp_path, sig, *extra, mode="nokd") -> tuple[str, subprocess.Popen]:
    """Start a training (``extra``: more CLI arguments), send ``sig`` once its first epoch
    checkpoint exists, wait for it to exit -> (run id, process)."""
    before = set((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else set()
    proc = _train(tmp_path, *extra, mode=mode, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:
        new = [d for d in (tmp_path / "runs").glob("*") if d not in before] if (tmp_path / "runs").exists() else []
        if new and (new[0] / "last.pt").exists():
            proc.send_signal(sig)
            proc.wait(timeout=60)
            return new[0].name, proc
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no epoch checkpoint appeared")


def _the_run_id(tmp_path) -> str:
    """The one run of the experiment in ``tmp_path``'s store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    return run.info.run_id


def _metrics(tmp_path, run_id):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    history = sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)
    losses = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    return run, [(m.step, m.value) for m in history], [(m.step, m.value) for m in losses]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """mode -> (its directory, the metrics of an uninterrupted run), made once per mode."""
    made = {}

    def reference_of(mode):
        if mode not in made:
            tmp = tmp_path_factory.mktemp(f"resume-{mode}")
            proc = _train(tmp, mode=mode)
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[mode] = tmp, _metrics(tmp, _the_run_id(tmp))
        return made[mode]

    return reference_of


@pytest.fixture(scope="module")
def reference(references):
    return references("nokd")


@pytest.mark.parametrize("mode", sorted(MODE_ARGS))
def test_sigkill_then_resume_gives_the_uninterrupted_numbers(references, mode):
    tmp, (ref_run, ref_val, ref_loss) = references(mode)
    run_id, proc = _interrupt_after_first_epoch(tmp, signal.SIGKILL, mode=mode)
    assert proc.returncode == -signal.SIGKILL
    run, _, _ = _metrics(tmp, run_id)
    assert run.info.status == "RUNNING"  # SIGKILL leaves no chance to say otherwise

    resumed = _train(tmp, "--resume", run_id, mode=mode)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run_id}" in resumed.stderr
    run, val, loss = _metrics(tmp, run_id)
    assert run.info.status == "FINISHED"
    assert val == ref_val and loss == ref_loss  # one value per epoch, bit-identical
    assert run.data.metrics["test_acc"] == ref_run.data.metrics["test_acc"]


def test_sigterm_marks_killed_then_resume_auto(reference):
    tmp, (ref_run, ref_val, _) = reference
    run_id, proc = _interrupt_after_first_epoch(tmp, signal.SIGTERM)
    assert proc.returncode == 143
    assert "marked KILLED" in proc.stderr.read()
    run, _, _ = _metrics(tmp, run_id)
    assert run.info.status == "KILLED"

    resumed = _train(tmp, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run_id}" in resumed.stderr
    run, val, _ = _metrics(tmp, run_id)
    assert run.info.status == "FINISHED" and val == ref_val
    assert run.data.metrics["test_acc"] == ref_run.data.metrics["test_acc"]


def test_resume_refuses_other_settings_and_finished_runs(reference):
    tmp, (ref_run, _, _) = reference
    done = _train(tmp, "--resume", ref_run.info.run_id)
    assert done.returncode == 2 and "already FINISHED" in done.stderr
    missing = _train(tmp, "--resume", "0123456789abcdef0123456789abcdef")
    assert missing.returncode == 2 and "cannot resume" in missing.stderr


@pytest.mark.parametrize("taken", [2, 3, 4])  # mid-pass, at the end of a pass, in the second pass
def test_uda_unlabeled_stream_continues_from_its_checkpoint_state(taken):
    import torch

    from kd_mlflow.data import DATASETS, DeviceBatches, Split
    from kd_mlflow.methods.uda.distiller import UnlabeledStream

    info = DATASETS["fashion_mnist"]
    g = torch.Generator().manual_seed(0)
    pool = Split(torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8, generator=g), torch.zeros(30, dtype=torch.long))

    def stream():  # 3 batches per pass, augmented: order and crops come from the stream's generator
        return UnlabeledStream(DeviceBatches(pool, info, 10, device="cpu", shuffle=True, augment=True, seed=1))

    uninterrupted = stream()
    for _ in range(taken):
        next(uninterrupted)
    state = torch.load(_roundtrip(uninterrupted.state()), weights_only=True)
    resumed = stream()
    resumed.load_state(state)
    for _ in range(5):
        assert torch.equal(next(resumed), next(uninterrupted))


def _roundtrip(obj):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
