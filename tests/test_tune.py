"""`kd-mlflow tune`: Optuna's TPE on Ray Tune with ASHA, every trial a nested MLflow run.

A space where some trials cannot learn (a learning rate of 1e-5 learns nothing in an epoch)
must have those trials stopped by ASHA after the grace epoch and marked pruned; the tune run
must select on validation accuracy alone; a completed trial must give the numbers of the
same cell trained by `train`. Real Ray (local), real test server."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import cli_options as _options, learned_metrics, unique_experiment
from test_compare_registry import clean_mlflow_env

pytestmark = pytest.mark.e2e
pytest.importorskip("ray")
pytest.importorskip("optuna")

CELL = dict(epochs=3, train_subset=512, val_size=200, test_subset=200, batch_size=64, device="cpu", threads=1)


def _learned(client, run_id: str) -> dict:
    return learned_metrics(client, client.get_run(run_id))


def test_tune_prunes_trials_that_cannot_learn_and_selects_on_validation(tracking, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking)
    experiment = unique_experiment("tune")
    out = CliRunner().invoke(main, ["tune", "nokd", "--space", "lr=choice:0.1,0.00001", "--trials", "4",
                                    "--grace-epochs", "1", "--jobs", "1", *_options(CELL), "--experiment", experiment])
    assert out.exit_code == 0, out.output
    exp = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs([exp.experiment_id], "tags.mode = 'tune'")
    trials = client.search_runs([exp.experiment_id], f"tags.tune_run_id = '{parent.info.run_id}'")
    assert len(trials) == 4, out.output
    by_lr = {"0.1": [], "1e-05": []}
    for run in trials:
        by_lr[run.data.params["lr"]].append(run)
    assert by_lr["0.1"] and by_lr["1e-05"], out.output  # the seeded search tried both
    for run in by_lr["1e-05"]:  # below the first trial's val_acc at epoch 1: stopped there
        assert run.info.status == "KILLED"
        assert run.data.tags["kd_mlflow.pruned_at_epoch"] == "1"
        assert "test_acc" not in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0]
    for run in by_lr["0.1"]:
        assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    assert out.output.count(": pruned at epoch 1") == len(by_lr["1e-05"])
    # selection on validation only; the parent reports the chosen trial's test_acc alone
    best = max(by_lr["0.1"], key=lambda r: r.data.metrics["best_val_acc"])
    assert parent.data.params["best_lr"] == "0.1"
    assert parent.data.metrics["best_val_acc"] == best.data.metrics["best_val_acc"]
    assert parent.data.metrics["best_trial_test_acc"] == best.data.metrics["test_acc"]
    assert parent.data.metrics["trials_pruned"] == len(by_lr["1e-05"])
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/tune_history.png", "figures/tune_parameters.png"}

    # a trial is an ordinary cell: the same numbers as `train` with its parameters
    reference = unique_experiment("tune-reference")
    again = CliRunner().invoke(main, ["train", "nokd", "--lr", "0.1", "--seed", "0", *_options(CELL),
                                      "--experiment", reference])
    assert again.exit_code == 0, again.output
    [trained] = client.search_runs([client.get_experiment_by_name(reference).experiment_id])
    assert _learned(client, best.info.run_id) == _learned(client, trained.info.run_id)


def test_a_grid_on_ray_trains_every_cell_as_train_would(tracking, tmp_path, monkeypatch):
    """`tune kd --search grid`: kdparam's grid as Ray trials, two at once (one thread each);
    every combination completes, and a cell has the numbers of `train` at its values."""
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking)
    cell = dict(CELL, epochs=1, teacher="pretrained:fashion_mnist-resnet20")
    experiment = unique_experiment("tune-grid")
    out = CliRunner().invoke(main, ["tune", "kd", "--search", "grid", "--space", "temperature=choice:2,4",
                                    "--space", "alpha=choice:0.5,0.9", "--jobs", "2", *_options(cell),
                                    "--experiment", experiment])
    assert out.exit_code == 0, out.output
    exp = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs([exp.experiment_id], "tags.mode = 'tune'")
    trials = client.search_runs([exp.experiment_id], f"tags.tune_run_id = '{parent.info.run_id}'")
    assert sorted((r.data.params["temperature"], r.data.params["alpha"]) for r in trials) == [
        ("2.0", "0.5"), ("2.0", "0.9"), ("4.0", "0.5"), ("4.0", "0.9")]
    assert all(r.info.status == "FINISHED" for r in trials)
    assert parent.data.metrics["trials_completed"] == 4 and parent.data.metrics["trials_pruned"] == 0
    [chosen] = [r for r in trials if r.data.params["temperature"] == "2.0" and r.data.params["alpha"] == "0.5"]
    reference = unique_experiment("tune-grid-reference")
    again = CliRunner().invoke(main, ["train", "kd", "--temperature", "2", "--alpha", "0.5", "--seed", "0",
                                      *_options(cell), "--experiment", reference])
    assert again.exit_code == 0, again.output
    [trained] = client.search_runs([client.get_experiment_by_name(reference).experiment_id])
    assert _learned(client, chosen.info.run_id) == _learned(client, trained.info.run_id)


@pytest.mark.parametrize("space, message", [
    ("lr=uniform:0.5", "give LOW:HIGH"),
    ("beta=uniform:0:1", "nokd has no parameter 'beta'"),
    ("lr=normal:0:1", "is not NAME=KIND:ARGS"),
    ("lr=loguniform:0:1", "loguniform needs LOW > 0"),
    ("batch_size=uniform:32:64", "use int:LOW:HIGH or choice"),
    ("temperature=int:1:4", "nokd has no parameter"),
    ("epochs=int:1:5", "cannot search epochs"),
    ("lr=uniform:0.1:0.2 --search grid", "is a range: give choice"),
])
def test_tune_refuses_a_bad_space_in_one_line(space, message, tmp_path, monkeypatch):
    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = CliRunner().invoke(main, ["tune", "nokd", "--space", *space.split(" ", 1)[:1], *space.split()[1:]])
    assert out.exit_code == 2, out.output
    assert message in out.output and len(out.output.strip().splitlines()) == 1, out.output
    assert not (tmp_path / "mlflow.db").exists()


def test_the_tune_entry_point_of_mlflow_run(mlflow_server):
    """`mlflow run . -e tune`: the space arrives as one quoted parameter; the launcher's run
    becomes the tune run, the trials its children."""
    from conftest import mlflow_run, runs_of

    experiment = unique_experiment("tune-entry")
    mlflow_run("tune", mlflow_server, experiment,
               {"mode": "kd", "space": "alpha=uniform:0.5:0.99 temperature=choice:2,4", "trials": 2,
                "teacher": "pretrained:fashion_mnist-resnet20", "epochs": 2, "train_subset": 256, "val_size": 100,
                "test_subset": 100, "batch_size": 64, "device": "cpu", "threads": 1})
    _, runs = runs_of(mlflow_server, experiment)
    [parent] = [r for r in runs if r.data.tags.get("mode") == "tune"]
    trials = [r for r in runs if r.data.tags.get("tune_run_id") == parent.info.run_id]
    assert len(runs) == 3 and len(trials) == 2
    # as MLflow's launcher logged it (quoted: it holds a space)
    assert parent.data.params["space"].strip("'") == "alpha=uniform:0.5:0.99 temperature=choice:2,4"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    for run in trials:
        assert 0.5 <= float(run.data.params["alpha"]) <= 0.99 and run.data.params["temperature"] in ("2.0", "4.0")
