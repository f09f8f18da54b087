"""allkd, kdparam and takd end to end on real Fashion-MNIST (tiny settings), read back
from MLflow: parent and nested child runs, params per stage, selection, registry and
figures; plus bad input that must fail before any run exists."""

from __future__ import annotations

import json

import pytest

from conftest import sqlite_store

from kd_mlflow.checkpoint import save_model_checkpoint
from kd_mlflow.config import Config, ConfigError
from kd_mlflow.models import create_model
from kd_mlflow.teachers.pretrained import PRETRAINED_DIR
from kd_mlflow.runner import run

PROVENANCE = ("code_version", "torch_version", "cpu_kind", "precision", "threads")
TINY = dict(dataset="fashion_mnist", student="resnet8", epochs=1, train_subset=256, val_size=128, test_subset=256,
            batch_size=64, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite tracking + registry store for the module (creating its tables costs
    seconds); each test works in its own experiment."""
    import mlflow

    uri = sqlite_store(tmp_path_factory.mktemp("mlflow"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield mlflow.MlflowClient(uri, uri)
        while mlflow.active_run():
            mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture
def env(store, tmp_path, monkeypatch, request):
    """-> (client, tiny Config values logging to this test's own experiment); runs/ and
    artifacts land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return store, {**TINY, "experiment": request.node.name}


def teacher_checkpoint(path, arch="resnet8", test_acc=12.3, dataset="fashion_mnist"):
    return str(save_model_checkpoint(path, create_model(arch, 10, 1),
                                     {"arch": arch, "dataset": dataset, "num_classes": 10, "in_channels": 1,
                                      "test_acc": test_acc}))


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def parent_and_children(client, run_id):
    parent = client.get_run(run_id)
    children = [r for r in client.search_runs([parent.info.experiment_id]) if r.data.tags.get("mlflow.parentRunId") == run_id]
    children.sort(key=lambda r: r.info.start_time)
    return parent, children


def artifact_paths(client, run_id, path=None):
    return {a.path for a in client.list_artifacts(run_id, path)}


def read_json_artifact(client, run_id, path, tmp_path):
    local = client.download_artifacts(run_id, path, str(tmp_path))
    with open(local) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- kdparam
def test_kdparam_grid_runs_one_child_per_cell_and_registers_the_best(env, tmp_path):
    client, tiny = env
    ckpt = teacher_checkpoint(tmp_path / "teacher.pt")
    cfg = Config.for_mode("kdparam", teacher_checkpoint=ckpt, temperatures="2,8", alphas="0.3,0.9",
                          registered_model="fashion_mnist-resnet8-kdparam", **tiny)  # smoke runs register when named
    result = run(cfg)

    parent, children = parent_and_children(client, result.run_id)
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["mode"] == "kdparam"
    assert len(children) == 4
    cells = sorted((float(c.data.params["temperature"]), float(c.data.params["alpha"])) for c in children)
    assert cells == [(2.0, 0.3), (2.0, 0.9), (8.0, 0.3), (8.0, 0.9)]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mode"] == "kd" and child.data.tags["parent_mode"] == "kdparam"
        assert child.data.params["teacher_checkpoint"] == ckpt
        assert "temperatures" not in child.data.params  # the child logs the kd procedure's fields
        assert child.data.metrics["teacher_test_acc"] == pytest.approx(12.3)

    by_cell = {(float(c.data.params["temperature"]), float(c.data.params["alpha"])): c for c in children}
    best_val = max(c.data.metrics["best_val_acc"] for c in children)
    best = by_cell[(parent.data.metrics["best_temperature"], parent.data.metrics["best_alpha"])]
    assert best.data.metrics["best_val_acc"] == best_val
    assert parent.data.tags["selected_run_id"] == best.info.run_id
    assert float(parent.data.tags["best_temperature"]) == parent.data.metrics["best_temperature"]
    assert float(parent.data.tags["best_alpha"]) == parent.data.metrics["best_alpha"]
    assert parent.data.metrics["test_acc"] == pytest.approx(best.data.metrics["test_acc"])
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best_val)
    assert result.test_acc == pytest.approx(best.data.metrics["test_acc"])

    assert result.registered_model == "fashion_mnist-resnet8-kdparam" and result.version == 1
    version = client.get_model_version("fashion_mnist-resnet8-kdparam", "1")
    # the version is the strategy run's (its page lists it); its model is the selected child's
    assert version.run_id == parent.info.run_id
    assert version.source == "models:/" + best.outputs.model_outputs[0].model_id
    assert "figures/kdparam_heatmap.png" in artifact_paths(client, result.run_id, "figures")
    grid = read_json_artifact(client, result.run_id, "kdparam_grid.json", tmp_path)
    assert len(grid) == 4 and sum(row["selected"] for row in grid) == 1
    assert {row["child_run_id"] for row in grid} == {c.info.run_id for c in children}


def test_a_stopped_kdparam_takes_over_its_finished_cells_when_the_benchmark_continues(env, tmp_path):
    """A real SIGTERM to a benchmark once its kdparam cell has finished part of its grid:
    the same command starts kdparam again as a new run (a strategy keeps no checkpoint of
    its own), which takes over the grid cells that had finished, same runs and numbers,
    instead of training them again, and trains only the rest."""
    import signal
    import subprocess
    import sys
    import time

    client, tiny = env
    experiment = tiny["experiment"]
    ckpt = teacher_checkpoint(tmp_path / "teacher.pt")
    args = [sys.executable, "-m", "kd_mlflow", "benchmark", "--modes", "kdparam", "--seeds", "1",
            "--teacher-checkpoint", ckpt, "--temperatures", "2,4,8", "--alphas", "0.9", "--epochs", "2",
            "--train-subset", "512", "--val-size", "128", "--test-subset", "256", "--batch-size", "64",
            "--device", "cpu", "--threads", "1", "--experiment", experiment]

    def grid_runs():
        return [r for r in runs_of(client, experiment) if r.data.tags.get("parent_mode") == "kdparam"]

    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not any(r.info.status == "FINISHED" for r in grid_runs()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    before = {r.info.run_id: r for r in grid_runs()}
    finished = {i for i, r in before.items() if r.info.status == "FINISHED"}
    assert finished and len(finished) < 3, output[-3000:]
    stopped_parent = {r.data.tags["mlflow.parentRunId"] for r in before.values()}
    assert len(stopped_parent) == 1 and client.get_run(stopped_parent.pop()).info.status == "KILLED"

    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("not trained again") == len(finished), again.stdout[-3000:]
    parents = [r for r in runs_of(client, experiment) if r.data.tags.get("mode") == "kdparam"]
    (new,) = [p for p in parents if p.info.status == "FINISHED"]
    _, children = parent_and_children(client, new.info.run_id)
    cells = sorted(float(c.data.params["temperature"]) for c in children)
    assert cells == [2.0, 4.0, 8.0] and all(c.info.status == "FINISHED" for c in children)
    assert finished <= {c.info.run_id for c in children}  # the same runs, now the new parent's
    for run_id in finished:  # untouched: not trained again
        assert client.get_run(run_id).data.metrics == before[run_id].data.metrics
    assert len(grid_runs()) <= 3 + 1  # at most the stopped cell's run beside the three
    grid = read_json_artifact(client, new.info.run_id, "kdparam_grid.json", tmp_path)
    assert {row["child_run_id"] for row in grid} == {c.info.run_id for c in children}


# ------------------------------------------------------------------------------ allkd
def test_allkd_trains_missing_teacher_then_one_student_per_teacher(env, tmp_path):
    client, tiny = env
    ckpt = teacher_checkpoint(tmp_path / "given.pt", test_acc=12.3)
    # The second teacher is an architecture with no committed pretrained/ checkpoint, so allkd
    # must train it first, in its own child. Read from the directory, not assumed: committing a
    # new teacher (resnet14 was) must not turn this into a test of the pretrained path.
    arch = next(a for a in ("resnet14", "resnet32", "resnet44")
                if not (PRETRAINED_DIR / f"fashion_mnist-{a}.pt").exists())
    cfg = Config.for_mode("allkd", teachers=f"{ckpt},{arch}", teacher_epochs=1,
                          registered_model="fashion_mnist-resnet8-allkd", **tiny)
    result = run(cfg)

    parent, children = parent_and_children(client, result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mode"] == "allkd"
    teachers = [c for c in children if c.data.tags["mode"] == "teacher"]
    students = [c for c in children if c.data.tags["mode"] == "kd"]
    assert len(children) == 3 and len(teachers) == 1 and len(students) == 2
    assert teachers[0].data.params["arch"] == arch and teachers[0].data.params["epochs"] == "1"
    assert all(c.data.tags["parent_mode"] == "allkd" for c in children)
    for tag in PROVENANCE:  # the teacher trained here as well as the students (cells)
        assert {c.data.tags[tag] for c in children} == {parent.data.tags[tag]}, tag
    assert sorted(s.data.params["teacher"] for s in students) == sorted([arch, "resnet8"])
    assert all(s.data.params["temperature"] == str(cfg.temperature) for s in students)

    trained_teacher = client.get_model_version(f"fashion_mnist-{arch}-teacher", "1")
    assert trained_teacher.run_id == teachers[0].info.run_id

    m = parent.data.metrics
    assert m["teacher_1_test_acc"] == pytest.approx(12.3)
    assert m["teacher_2_test_acc"] == pytest.approx(teachers[0].data.metrics["test_acc"])
    pairs = read_json_artifact(client, result.run_id, "pairs.json", tmp_path)
    assert [p["teacher_arch"] for p in pairs] == ["resnet8", arch]
    assert pairs[1]["teacher_trained_here"] and pairs[1]["teacher_source"] == f"models:/fashion_mnist-{arch}-teacher/1"
    for i, pair in enumerate(pairs, start=1):
        child = client.get_run(pair["child_run_id"])
        assert m[f"student_{i}_val_acc"] == pytest.approx(child.data.metrics["best_val_acc"])
        assert m[f"student_{i}_test_acc"] == pytest.approx(child.data.metrics["test_acc"])

    selected = [p for p in pairs if p["selected"]]
    assert len(selected) == 1
    assert selected[0]["student_best_val_acc"] == max(p["student_best_val_acc"] for p in pairs)
    assert m["test_acc"] == pytest.approx(selected[0]["student_test_acc"])
    assert result.test_acc == pytest.approx(selected[0]["student_test_acc"])
    assert result.registered_model == "fashion_mnist-resnet8-allkd"
    version = client.get_model_version(result.registered_model, str(result.version))
    assert version.run_id == parent.info.run_id
    assert version.source == "models:/" + client.get_run(selected[0]["child_run_id"]).outputs.model_outputs[0].model_id
    assert "figures/teacher_vs_student.png" in artifact_paths(client, result.run_id, "figures")


# ------------------------------------------------------------------------------- takd
def test_takd_chains_teacher_assistant_student(env, tmp_path):
    client, tiny = env
    ckpt = teacher_checkpoint(tmp_path / "teacher.pt", arch="resnet20", test_acc=40.0)
    cfg = Config.for_mode("takd", teacher="resnet20", teacher_checkpoint=ckpt, assistants="resnet14",
                          registered_model="fashion_mnist-resnet8-takd", **tiny)
    result = run(cfg)

    parent, children = parent_and_children(client, result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mode"] == "takd"
    assert len(children) == 2
    link1, link2 = children
    assert (link1.data.params["teacher"], link1.data.params["student"]) == ("resnet20", "resnet14")
    assert (link2.data.params["teacher"], link2.data.params["student"]) == ("resnet14", "resnet8")
    assert link1.data.params["teacher_checkpoint"] == ckpt
    assert link2.data.params["teacher_checkpoint"] == "models:/fashion_mnist-resnet14-takd-assistant/1"
    assert link2.data.metrics["teacher_test_acc"] == pytest.approx(link1.data.metrics["test_acc"])
    assert all(c.data.tags["parent_mode"] == "takd" and c.data.tags["mode"] == "kd" for c in children)
    for tag in PROVENANCE:  # every link says what its numbers depend on, as the parent does
        assert {c.data.tags[tag] for c in children} == {parent.data.tags[tag]}, tag

    m = parent.data.metrics
    for i, child in enumerate(children, start=1):
        assert m[f"link_{i}_test_acc"] == pytest.approx(child.data.metrics["test_acc"])
        assert m[f"link_{i}_val_acc"] == pytest.approx(child.data.metrics["best_val_acc"])
    assert m["test_acc"] == pytest.approx(link2.data.metrics["test_acc"]) == pytest.approx(result.test_acc)

    assistant = client.get_model_version("fashion_mnist-resnet14-takd-assistant", "1")
    assert assistant.run_id == link1.info.run_id
    assert result.registered_model == "fashion_mnist-resnet8-takd"
    version = client.get_model_version(result.registered_model, str(result.version))
    # takd's run page lists its student (the model is the last link's), named and tagged takd
    assert version.run_id == parent.info.run_id
    assert version.source == "models:/" + link2.outputs.model_outputs[0].model_id
    assert version.tags["mode"] == "takd" and version.tags["stage_mode"] == "kd"
    assert "figures/takd_chain.png" in artifact_paths(client, result.run_id, "figures")
    chain = read_json_artifact(client, result.run_id, "takd_chain.json", tmp_path)
    assert [row["arch"] for row in chain] == ["resnet20", "resnet14", "resnet8"]


# ------------------------------------------------------------------------ bad input
def test_allkd_missing_teacher_file_fails_before_any_run(env, tmp_path):
    client, tiny = env
    cfg = Config.for_mode("allkd", teachers=f"resnet14,{tmp_path / 'missing.pt'}", **tiny)
    with pytest.raises(ConfigError, match="missing.pt"):
        run(cfg)
    assert runs_of(client, tiny["experiment"]) == []


def test_allkd_teacher_of_another_dataset_fails_before_any_run(env, tmp_path):
    client, tiny = env
    other = save_model_checkpoint(tmp_path / "mnist.pt", create_model("resnet8", 10, 1),
                                  {"arch": "resnet8", "dataset": "mnist", "num_classes": 10, "in_channels": 1})
    with pytest.raises(ConfigError, match="not fashion_mnist"):
        run(Config.for_mode("allkd", teachers=str(other), **tiny))
    with pytest.raises(ConfigError, match="resnet7"):
        run(Config.for_mode("allkd", teachers="resnet7", **tiny))
    assert runs_of(client, tiny["experiment"]) == []


def test_takd_unknown_assistant_fails_before_any_run(env, tmp_path):
    client, tiny = env
    ckpt = teacher_checkpoint(tmp_path / "teacher.pt")
    cfg = Config.for_mode("takd", teacher_checkpoint=ckpt, assistants="resnet15", **tiny)
    with pytest.raises(ConfigError, match="resnet15"):
        run(cfg)
    assert runs_of(client, tiny["experiment"]) == []
