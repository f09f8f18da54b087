"""One number per cell: the same (mode, parameters, seed) gives bit-identical metrics
whichever path trains it: `kd-mlflow train`, a sweep, the benchmark with the teacher cache
on and off, `benchmark --jobs 2`, where the cell trains in a Ray worker beside another
cell, and kdparam's grid. All against the real test server.

The --jobs path used to give each worker cores // jobs torch threads, and a CPU run's
numbers change with its thread count (reductions are split across threads): on a 2-core
machine its kd cell then differed from the same cell run by `train` from the first epoch.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import cli_options as _options, learned_metrics, unique_experiment
from test_compare_registry import clean_mlflow_env

pytestmark = pytest.mark.e2e

CELL = dict(teacher="pretrained:fashion_mnist-resnet20", epochs=1, train_subset=256, val_size=100,
            test_subset=200, batch_size=64, device="cpu")


def _kd_cell(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.mode = 'kd' and params.seed = '0'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    # what the cell learned, as logged: every per-epoch and final metric but the timings
    return run, learned_metrics(client, run)


def test_a_cell_gives_the_same_numbers_through_every_path(tracking, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking)
    paths = {
        "train": ["train", "kd", "--seed", "0", *_options(CELL)],
        "sweep": ["sweep", "kd", "--param", "alpha", "--values", "0.9", "--seeds", "1", *_options(CELL)],
        "benchmark": ["benchmark", "--modes", "kd", "--seeds", "1", *_options(CELL)],
        "benchmark, no teacher cache": ["benchmark", "--modes", "kd", "--seeds", "1", "--teacher-cache", "false",
                                        *_options(CELL)],
        # two cells at once on a local Ray: kd seed 0 and nokd seed 0
        "benchmark --jobs 2": ["benchmark", "--modes", "kd,nokd", "--seeds", "1", "--jobs", "2", *_options(CELL)],
        # kdparam's grid of one cell at kd's defaults (T 4, alpha 0.9): its child is that kd run
        "kdparam": ["train", "kdparam", "--temperatures", "4", "--alphas", "0.9", "--seed", "0", *_options(CELL)],
    }
    cells = {}
    for path, args in paths.items():
        experiment = unique_experiment("one-cell")
        out = CliRunner().invoke(main, [*args, "--experiment", experiment])
        assert out.exit_code == 0, f"{path}:\n{out.output}"
        cells[path] = _kd_cell(client, experiment)

    reference_run, reference = cells["train"]
    assert {"val_acc", "train_loss", "loss_kd", "loss_ce", "test_correct", "best_val_acc"} <= set(reference)
    assert len(reference["val_acc"]) == CELL["epochs"]
    for path, (run, learned) in cells.items():
        assert learned == reference, path
        # what the numbers depend on, recorded on every run the same way
        for tag in ("code_version", "torch_version", "cpu_kind", "precision", "threads"):
            assert run.data.tags.get(tag) == reference_run.data.tags[tag], (path, tag)
    assert int(reference_run.data.tags["threads"]) >= 1


def test_a_finished_cell_of_another_code_version_is_not_reused(tracking, tmp_path, monkeypatch):
    """A benchmark resumes by skipping finished cells, but only those its own code made:
    one table never mixes code versions."""
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking)
    experiment = unique_experiment("code-version")
    args = ["benchmark", "--modes", "nokd", "--seeds", "1", "--experiment", experiment,
            *_options(CELL)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    exp = client.get_experiment_by_name(experiment)
    (cell,) = client.search_runs([exp.experiment_id], "tags.mode = 'nokd'")
    again = CliRunner().invoke(main, args)
    assert "1 skipped" in again.output and "0 trained" in again.output, again.output
    client.set_tag(cell.info.run_id, "code_version", "another")  # as if an older package had made it
    third = CliRunner().invoke(main, args)
    assert third.exit_code == 0, third.output
    assert "1 trained" in third.output and "0 skipped" in third.output, third.output
