"""`kd-mlflow sweep`: one mode's weight over a grid of values x seeds as nested runs of a
real tracking server, a per-value table that selects by validation accuracy, and resume."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from conftest import unique_experiment
from test_compare_registry import clean_mlflow_env

from kd_mlflow.config import ConfigError
from kd_mlflow.sweep import plan_sweep, sweep_table

TINY = dict(teacher="pretrained:fashion_mnist-resnet20", epochs=1, train_subset=300, val_size=200,
            test_subset=300, batch_size=100, device="cpu", precision="fp32")


def test_plan_rejects_bad_input_before_any_run():
    for args, needle in [(("pkd", "nope", "1,2"), "has no parameter 'nope'"),
                         (("kdparam", "pkd_weight", "1"), "single-training modes"),
                         (("pkd", "pkd_weight", "1,x"), "comma-separated list of numbers"),
                         (("pkd", "pkd_weight", "-1"), "pkd_weight must be >= 0"),
                         (("pkd", "student", "1"), "numeric parameter")]:
        with pytest.raises(ConfigError, match=needle):
            plan_sweep(*args, 1, {})
    configs = plan_sweep("sfd", "sfd_weight", "0.5, 2", 2, {"epochs": 3})
    assert [(c.sfd_weight, c.seed, c.epochs) for c in configs] == [(0.5, 0, 3), (0.5, 1, 3), (2.0, 0, 3), (2.0, 1, 3)]


def test_sweep_table_selects_by_validation_not_test():
    rows = [{"value": 1.0, "seed": 0, "best_val_acc": 80.0, "test_acc": 90.0, "test_acc_last": 89.0},
            {"value": 1.0, "seed": 1, "best_val_acc": 82.0, "test_acc": 92.0, "test_acc_last": 91.0},
            {"value": 10.0, "seed": 0, "best_val_acc": 85.0, "test_acc": 70.0, "test_acc_last": 69.0}]
    table = sweep_table(rows, "beta").set_index("beta")
    assert table.loc[1.0, "test_acc_mean"] == 91.0 and table.loc[1.0, "seeds"] == 2
    assert table.loc[1.0, "best_val_acc_std"] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(table.loc[10.0, "test_acc_std"])
    assert list(table["selected"]) == [False, True]  # 85 > 81 on validation, though its test is worse


@pytest.mark.e2e
def test_sweep_nested_runs_table_and_resume(tracking, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    experiment = unique_experiment("sweep")
    args = ["sweep", "sfd", "--param", "sfd_weight", "--values", "0.5,2", "--seeds", "1", "--output", "t.csv",
            "--experiment", experiment, *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("mode") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(float(c.data.params["sfd_weight"]) for c in children) == [0.5, 2.0]
    assert all(c.info.status == "FINISHED" and "test_acc_last" in c.data.metrics for c in children)
    table = (tmp_path / "t.csv").read_text().splitlines()
    assert table[0].startswith("sfd_weight,seeds,best_val_acc_mean") and len(table) == 3
    val = {float(c.data.params["sfd_weight"]): c.data.metrics["best_val_acc"] for c in children}
    assert parent.data.metrics["selected_value"] == max(val, key=lambda b: (val[b], -b))
    # the same command again trains nothing
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "2 skipped" in again.output and "0 trained" in again.output
