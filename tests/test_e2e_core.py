"""End to end: `mlflow run . -e teacher|nokd|kd --env-manager local` against a real
tracking server, then everything read back through MlflowClient."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY, mlflow_run, runs_of, unique_experiment

pytestmark = pytest.mark.e2e

EPOCH_METRICS = ("train_loss", "train_acc", "val_acc", "lr", "epoch_seconds", "images_per_second")


def check_run(client, run, mode: str, terms: tuple, epochs: int):
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["mode"] == mode
    for key in ("dataset", "epochs", "batch_size", "lr", "seed", "train_subset", "device", "data_dir"):
        assert key in params, key
    for key in ("mode", "dataset", "student", "teacher", "git_commit"):
        assert tags.get(key), key
    for name in (*EPOCH_METRICS, *(f"loss_{t}" for t in terms)):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(epochs)), name
    for name in ("test_acc", "best_val_acc"):
        assert 0.0 <= metrics[name] <= 100.0
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert metrics["best_val_acc"] == pytest.approx(max(val))
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    parts = [client.get_metric_history(run.info.run_id, f"loss_{t}") for t in terms]
    for step, total in enumerate(sorted(losses, key=lambda m: m.step)):
        assert total.value == pytest.approx(sum(sorted(p, key=lambda m: m.step)[step].value for p in parts), rel=1e-5)
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert "figures/learning_curves.png" in figures
    config = json.loads(open(client.download_artifacts(run.info.run_id, "config.json")).read())
    assert config["mode"] == mode and config["epochs"] == epochs


def registered_version(client, name: str, run_id: str):
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    assert len(versions) == 1, f"{name} has no version from run {run_id}"
    return versions[0]


def correct_in_fresh_process(server: str, uri: str, test_subset: int) -> tuple[int, int]:
    """Load the registered model with mlflow.pytorch.load_model in a new interpreter and
    count its correct images on the real test split, independently of the trainer:
    -> (correct, images)."""
    script = f"""
import mlflow, mlflow.pytorch, torch
from kd_mlflow.data import load_arrays, DATASETS
mlflow.set_tracking_uri({server!r})
model = mlflow.pytorch.load_model({uri!r})
_, _, x, y = load_arrays("fashion_mnist")
x, y = torch.tensor(x[:{test_subset}]).float(), torch.tensor(y[:{test_subset}]).long()
info = DATASETS["fashion_mnist"]
x = (x - torch.tensor(info.mean).view(1, -1, 1, 1) * 255) / (torch.tensor(info.std).view(1, -1, 1, 1) * 255)
with torch.no_grad():
    pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
print(int((pred == y).sum()), len(y))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    correct, n = out.stdout.strip().splitlines()[-1].split()
    return int(correct), int(n)


def test_teacher_entry_point(teacher_run, mlflow_server):
    client, runs = runs_of(mlflow_server, teacher_run["experiment"])
    assert len(runs) == 1  # the run `mlflow run` created, adopted: never a second top-level run
    run = runs[0]
    check_run(client, run, "teacher", ("ce",), epochs=2)
    assert run.data.params["arch"] == "resnet8"
    ckpt = teacher_run["checkpoint"]
    assert ckpt.is_file()
    import torch

    obj = torch.load(ckpt, weights_only=True)
    assert obj["meta"]["arch"] == "resnet8" and obj["meta"]["num_classes"] == 10
    assert obj["meta"]["in_channels"] == 1 and obj["meta"]["dataset"] == "fashion_mnist"
    assert obj["meta"]["test_acc"] == pytest.approx(run.data.metrics["test_acc"])
    registered_version(client, "fashion_mnist-resnet8-teacher", run.info.run_id)


# kd with bf16 and with fp32 forced: on a CPU without native bf16 oneDNN emulates it (slow,
# fine on 1,000 images). Either way the registry's number is the exported fp32 model's.
@pytest.mark.parametrize("mode,terms,precision", [("nokd", ("ce",), "auto"), ("kd", ("ce", "kd"), "bf16"),
                                                  ("kd", ("ce", "kd"), "fp32")],
                         ids=["nokd-auto", "kd-bf16", "kd-fp32"])
def test_mode_entry_point(mode, terms, precision, teacher_run, mlflow_server):
    experiment = unique_experiment(mode)
    params = {**TINY, "teacher_checkpoint": teacher_run["checkpoint"], "registered_model": f"e2e-{experiment}",
              "precision": precision}
    proc = mlflow_run(mode, mlflow_server, experiment, params)
    client, runs = runs_of(mlflow_server, experiment)
    assert len(runs) == 1
    run = runs[0]
    check_run(client, run, mode, terms, epochs=TINY["epochs"])
    if mode == "kd":
        assert run.data.params["temperature"] == "4.0" and run.data.params["alpha"] == "0.9"
        assert run.data.tags["teacher"] == "resnet8"
    metrics = run.data.metrics
    if precision != "auto":
        assert run.data.tags["precision"] == precision
    # the autocast score is kept under its own name, and only when autocast trained the run
    assert ("test_acc_bf16" in metrics) == (run.data.tags["precision"] == "bf16")
    version = registered_version(client, f"e2e-{experiment}", run.info.run_id)
    # the registry says what the run says: nokd had no teacher, whatever -P teacher holds
    assert version.tags["teacher"] == run.data.tags["teacher"] == ("none" if mode == "nokd" else "resnet8")
    assert ("(no teacher)" in version.description) == (mode == "nokd")
    assert "test_acc" in proc.stdout and run.info.run_id in proc.stdout
    correct, n = correct_in_fresh_process(mlflow_server, f"models:/e2e-{experiment}/{version.version}",
                                          TINY["test_subset"])
    # The registered model reproduces the logged count exactly, whatever precision trained it.
    assert (correct, n) == (int(metrics["test_correct"]), int(metrics["test_images"])) == (correct, TINY["test_subset"])
    assert metrics["test_acc"] == 100.0 * correct / n
    assert 0 <= int(metrics["test_correct_last"]) <= n


def test_a_run_that_fails_on_bad_input_says_why_in_mlflow(mlflow_server):
    """`mlflow run` creates the run before kd-mlflow reads its parameters: a refused one
    ends that run FAILED with the one-line reason as its description and a tag, not a
    bare FAILED."""
    experiment = unique_experiment("bad-input")
    proc = mlflow_run("kd", mlflow_server, experiment, {**TINY, "epochs": 0}, check=False)
    assert proc.returncode != 0
    assert "epochs must be >= 1" in proc.stderr
    client, runs = runs_of(mlflow_server, experiment)
    (run,) = runs
    assert run.info.status == "FAILED"
    assert "epochs must be >= 1" in run.data.tags["kd_mlflow.error"]
    assert run.data.tags["mlflow.note.content"].startswith("**Failed:** ")
    assert "epochs must be >= 1" in run.data.tags["mlflow.note.content"]
