"""compare, benchmark and the model registry, against a real `mlflow server`.

compare: synthetic runs made with MlflowClient (params, per-epoch metrics, statuses,
nesting) whose statistics the test computes independently (means, sample standard
deviations, Welch's interval with a hand-computed t quantile), plus runs that must be
left out and listed. benchmark: one real tiny run through `mlflow run . -e benchmark`,
then the same benchmark again through `kd-mlflow benchmark`, which must train nothing.
registry: real tiny trainings registered as versions of one model; the champion alias
follows test_acc; a fresh process pulls the champion, and its accuracy on the real
Fashion-MNIST test split reproduces the logged test_acc.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import subprocess

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import BIN, REPO, mlflow_run, runs_of, sqlite_store, unique_experiment

from kd_mlflow.benchmark import BENCHMARK_FIELDS, parse_modes, plan
from kd_mlflow.cli import main
from kd_mlflow.analysis.compare import compare_experiment, summarize
from kd_mlflow.analysis.report import display_table
from kd_mlflow.analysis.statistics import holm, paired_interval, t_cdf, t_quantile, welch_interval
from kd_mlflow.config import ConfigError
from kd_mlflow.modes import DISTILLATION_MODES
from kd_mlflow.tracking.registry import parse_model_spec

# ---------------------------------------------------------------- pure functions
# Student-t 0.975 quantiles: df 1 and 2 in closed form, the others from printed tables.
T975 = {1: math.tan(math.pi * (0.975 - 0.5)), 2: 0.95 / math.sqrt(2 * 0.975 * 0.025),
        4: 2.7764451051977934, 10: 2.228138851986274, 30: 2.0422724563012378}


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_closed_forms_and_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)
    assert t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-9)


def test_t_quantile_non_integer_df_and_normal_limit():
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963984540054, rel=1e-12)
    # between its integer neighbours, and the inverse of the t CDF the p-values use
    q = t_quantile(0.975, 2.5)
    assert T975[4] < q < T975[2]
    for df in (1.3, 2.5, 7.77, 55.0):
        for p in (0.025, 0.975):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, rel=1e-9)


def test_welch_interval_needs_two_values_per_side():
    assert welch_interval([1.0], [1.0, 2.0]) is None
    ci = welch_interval([85.0, 87.0], [80.0, 82.0])
    half = T975[2] * math.sqrt(2.0)  # variances 2 and 2, n = 2 each: se^2 = 2, Welch df = 2
    assert (ci.diff, ci.df) == (pytest.approx(5.0), pytest.approx(2.0))
    assert (ci.low, ci.high) == (pytest.approx(5.0 - half), pytest.approx(5.0 + half))


def test_welch_p_value_and_holm_by_hand():
    # df = 2 has a closed-form t CDF, F(t) = 1/2 + t / (2 sqrt(2 + t^2)): two-sided p = 1 - t / sqrt(2 + t^2)
    ci = welch_interval([85.0, 87.0], [80.0, 82.0])
    t = 5.0 / math.sqrt(2.0)
    assert ci.p == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t), rel=1e-9)
    # Holm, m = 3: sorted .01, .03, .04 -> 3*.01, max(.03, 2*.03), max(.06, 1*.04); NaN stays out
    assert holm([0.04, 0.01, math.nan, 0.03]) == [pytest.approx(0.06), pytest.approx(0.03), _nan(),
                                                  pytest.approx(0.06)]
    assert holm([0.5, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1


class _nan:
    def __eq__(self, other):
        return isinstance(other, float) and math.isnan(other)


def test_paired_interval_on_matched_seeds_by_hand():
    # seeds 0 and 1 match (differences 4 and 3.5); seed 2 has no partner and is left out
    ci = paired_interval({0: 84.0, 1: 85.5, 2: 89.0}, {0: 80.0, 1: 82.0, 5: 70.0})
    se = statistics.stdev([4.0, 3.5]) / math.sqrt(2)  # 0.25
    assert (ci.diff, ci.df) == (pytest.approx(3.75), 1)
    assert (ci.low, ci.high) == (pytest.approx(3.75 - T975[1] * se), pytest.approx(3.75 + T975[1] * se))
    # df = 1 is the Cauchy distribution: two-sided p = 1 - (2 / pi) atan(|t|)
    assert ci.p == pytest.approx(1.0 - 2.0 / math.pi * math.atan(3.75 / se), rel=1e-9)
    assert paired_interval({0: 1.0, 1: 2.0}, {1: 2.0, 2: 3.0}) is None  # one matched seed


def test_summary_pairs_matched_seeds_and_keeps_welch_beside_it():
    # nokd and kd on seeds 0-2; the seed effect (+-3) is shared, so the paired test sees a
    # steady +2 while Welch's sees it buried in the seeds' spread
    nokd, kd = [80.0, 83.0, 86.0], [82.0, 85.5, 87.5]
    frame = pd.DataFrame([
        {"dataset": "d", "student": "s", "mode": m, "teacher": "t", "seed": i, "test_acc": acc,
         "test_acc_last": acc, "best_val_acc": 50.0, "teacher_test_acc": math.nan, "wall_seconds": 1.0}
        for m, accs in {"nokd": nokd, "kd": kd}.items() for i, acc in enumerate(accs)])
    summary = summarize(frame)
    row = summary.set_index("mode").loc["kd"]
    d = [b - a for a, b in zip(nokd, kd)]  # 2, 2.5, 1.5
    se = statistics.stdev(d) / math.sqrt(3)
    assert row["gain_test"] == "paired" and row["paired_seeds"] == "0,1,2"
    assert row["paired_gain"] == pytest.approx(2.0)
    assert row["paired_ci_low"] == pytest.approx(2.0 - t_quantile(0.975, 2) * se)
    # df = 2: two-sided p = 1 - t / sqrt(2 + t^2)
    t = 2.0 / se
    assert row["paired_p"] == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t), rel=1e-9)
    assert row["paired_p_holm"] == pytest.approx(row["paired_p"])  # one comparison
    welch = welch_interval(kd, nokd)
    assert (row["gain_ci_low"], row["gain_p"]) == (pytest.approx(welch.low), pytest.approx(welch.p))
    assert row["paired_p"] < 0.05 < row["gain_p"]
    shown = display_table(summary).set_index("mode").loc["kd"]
    assert shown["test"] == "paired (0,1,2)" and shown["p (Holm)"] == f"{row['paired_p_holm']:.3g}"
    # Welch's interval beside the paired one: the same +2.00, but wide enough to include 0
    assert shown["Welch [95% CI]"] == f"+2.00 [{welch.low:+.2f}, {welch.high:+.2f}]" and welch.low < 0
    # no epoch times (a runs CSV from before they were recorded): the wall time is shown
    assert "wall time (s)" in shown and "train time (s)" not in shown


def test_the_table_shows_the_epochs_time_when_every_mode_has_it():
    """A run stopped and continued later has the pause in its wall time: where every row has
    the sum of its epoch times, that is the column shown."""
    frame = pd.DataFrame([
        {"dataset": "d", "student": "s", "mode": m, "teacher": "t", "seed": i, "test_acc": 80.0 + i,
         "test_acc_last": 80.0, "best_val_acc": 50.0, "teacher_test_acc": math.nan,
         "wall_seconds": wall, "train_seconds": train}
        for m, rows in {"nokd": [(10.0, 9.0), (12.0, 11.0)], "kd": [(20.0, 18.0), (5000.0, 20.0)]}.items()
        for i, (wall, train) in enumerate(rows)])
    shown = display_table(summarize(frame)).set_index("mode")
    assert "wall time (s)" not in shown
    assert list(shown["train time (s)"]) == ["10.0", "19.0"]
    partly = frame.assign(train_seconds=[9.0, 11.0, 18.0, math.nan])  # one kd seed without: no mean of the rest
    shown = display_table(summarize(partly)).set_index("mode")
    assert "train time (s)" not in shown and list(shown["wall time (s)"]) == ["11.0", "2510.0"]


def test_compare_recomputes_a_committed_runs_csv_without_mlflow(tmp_path):
    """`compare --runs-csv`: the tables of a runs.csv (what --output-dir wrote) again, here
    the paired test on matched seeds beside Welch's, with no tracking server at all."""
    from kd_mlflow.cli import main

    nokd, kd = [80.0, 83.0, 86.0], [82.0, 85.5, 87.5]
    pd.DataFrame([{"run_id": f"{m}{i}", "run_name": f"{m}-seed{i}", "dataset": "d", "student": "s", "mode": m,
                   "teacher": "t", "seed": i, "test_acc": acc, "test_acc_last": acc, "best_val_acc": 50.0,
                   "teacher_test_acc": math.nan, "wall_seconds": 1.0, "parent_run_id": "", "history_run_id": ""}
                  for m, accs in {"nokd": nokd, "kd": kd}.items() for i, acc in enumerate(accs)]
                 ).to_csv(tmp_path / "runs.csv", index=False)
    out = CliRunner().invoke(main, ["compare", "--runs-csv", str(tmp_path / "runs.csv"),
                                    "--output-dir", str(tmp_path / "out")], env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert out.exit_code == 0, out.output
    assert "| +2.00 [" in out.output and "| paired (0,1,2) |" in out.output
    assert "6 run(s) record no code_version" in out.output
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("mode")
    assert summary.loc["kd", "paired_gain"] == pytest.approx(2.0) and summary.loc["kd", "gain_test"] == "paired"
    assert summary.loc["kd", "gain_p"] == pytest.approx(welch_interval(kd, nokd).p)
    bad = CliRunner().invoke(main, ["compare", "--runs-csv", str(tmp_path / "missing.csv")])
    assert bad.exit_code != 0 and "cannot read runs CSV" in bad.output


def test_summary_reports_the_last_epoch_beside_the_selected_student():
    frame = pd.DataFrame([
        {"dataset": "d", "student": "s", "mode": m, "teacher": "t", "seed": i, "test_acc": acc,
         "test_acc_last": last, "best_val_acc": 50.0, "teacher_test_acc": math.nan, "wall_seconds": 1.0}
        for m, rows in {"nokd": [(80.0, 79.0), (82.0, 81.0)], "kd": [(85.0, 86.0), (87.0, 88.0)]}.items()
        for i, (acc, last) in enumerate(rows)])
    rows = {r["mode"]: r for r in summarize(frame).to_dict("records")}
    assert rows["kd"]["test_acc_last_mean"] == 87.0 and rows["nokd"]["test_acc_last_mean"] == 80.0
    assert rows["kd"]["test_acc_last_std"] == pytest.approx(math.sqrt(2.0))
    assert rows["kd"]["gain_last_vs_nokd"] == pytest.approx(7.0)
    half = T975[2] * math.sqrt(2.0)
    assert (rows["kd"]["gain_last_ci_low"], rows["kd"]["gain_last_ci_high"]) == (pytest.approx(7.0 - half),
                                                                                 pytest.approx(7.0 + half))
    assert rows["kd"]["gain_p_holm"] == pytest.approx(rows["kd"]["gain_p"])  # one comparison: no adjustment


def test_model_spec_and_modes_parsing():
    assert parse_model_spec("m@champion").uri == "models:/m@champion"
    assert parse_model_spec("models:/fashion_mnist-resnet8-kd/3").uri == "models:/fashion_mnist-resnet8-kd/3"
    assert parse_model_spec("m").version is None and parse_model_spec("m").alias is None
    with pytest.raises(ConfigError):
        parse_model_spec("m/latest")
    assert parse_modes("all") == DISTILLATION_MODES and "teacher" not in DISTILLATION_MODES
    assert parse_modes("kd, nokd") == ["nokd", "kd"]
    with pytest.raises(ConfigError, match="unknown mode"):
        parse_modes("nokd,kdd")
    configs, notes = plan("nokd,multikd", 2, {"epochs": 1, "device": "cpu"})
    assert [(c.mode, c.seed) for c in configs] == [("nokd", 0), ("nokd", 1)]
    # fresh seeds for a confirmation no selection saw
    fresh, _ = plan("nokd,kd", 2, {"epochs": 1, "device": "cpu"}, first_seed=5)
    assert [(c.mode, c.seed) for c in fresh] == [("nokd", 5), ("kd", 5), ("nokd", 6), ("kd", 6)]
    with pytest.raises(ConfigError, match="first_seed must be >= 0"):
        plan("nokd", 1, {}, first_seed=-1)
    assert len(notes) == 1 and "multikd skipped" in notes[0] and "ensemble" in notes[0]


def test_compare_and_benchmark_entry_points_match_the_cli():
    entry = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    from kd_mlflow.execution import OPTIONS

    assert set(entry["benchmark"]["parameters"]) == {"modes", "seeds", "first_seed", "register", *OPTIONS, *BENCHMARK_FIELDS}
    assert entry["benchmark"]["parameters"]["modes"]["default"] == "all"
    assert entry["benchmark"]["parameters"]["seeds"]["default"] == 3
    assert set(entry["compare"]["parameters"]) == {"experiment"}
    helps = {name: CliRunner().invoke(main, [name, "--help"], terminal_width=200).output
             for name in ("benchmark", "compare")}
    for name in ("benchmark", "compare"):
        for param in entry[name]["parameters"]:
            assert f"--{param} {{{param}}}" in entry[name]["command"]
            assert f"--{param}" in helps[name], (name, param)


def test_benchmark_rejects_bad_input_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    out = CliRunner().invoke(main, ["benchmark", "--modes", "nokd,kdd", "--seeds", "1"])
    assert out.exit_code == 2 and "unknown mode(s) kdd" in out.output
    out = CliRunner().invoke(main, ["benchmark", "--modes", "ab", "--epochs", "1", "--device", "cpu"])
    assert out.exit_code == 2 and "mode ab:" in out.output
    out = CliRunner().invoke(main, ["benchmark", "--modes", "nokd", "--jobs", "-1"])
    assert out.exit_code == 2 and "--jobs must be a whole number >= 0" in out.output
    assert not (tmp_path / "never.db").exists()


def clean_mlflow_env(monkeypatch):
    """No run or experiment inherited from the environment, and none left behind:
    mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID, which would leak into the
    `mlflow run` subprocesses of later tests (setenv first so teardown removes it)."""
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


# ------------------------------------------------------- compare on synthetic runs
COMMON = {"dataset": "fashion_mnist", "student": "resnet8", "data_dir": "", "train_subset": "500",
          "val_size": "200", "test_subset": "300", "epochs": "3", "batch_size": "100", "lr": "0.1",
          "optimizer": "sgd", "momentum": "0.9", "weight_decay": "0.0005", "scheduler": "multistep",
          "device": "cpu", "precision": "fp32", "experiment": "", "registered_model": ""}
OWN = {"nokd": {"teacher": "resnet20", "teacher_checkpoint": ""},
       "kd": {"teacher": "resnet20", "teacher_checkpoint": "t.pt", "temperature": "4.0", "alpha": "0.9"},
       "rkd": {"teacher": "resnet20", "teacher_checkpoint": "t.pt", "temperature": "4.0", "alpha": "0.9",
               "rkd_distance_weight": "25.0", "rkd_angle_weight": "50.0"},
       "allkd": {"teachers": "resnet14,resnet20", "teacher_epochs": "0", "temperature": "4.0", "alpha": "0.9"}}


class Synth:
    """Creates runs as kd-mlflow logs them, with controlled start and end times."""

    def __init__(self, client, experiment_id):
        self.client, self.experiment_id = client, experiment_id
        self.clock = 1_700_000_000_000

    def run(self, mode, seed, test_acc, *, status="FINISHED", wall=10.0, teacher=None, params=None, tags=None,
            val=(50.0, 60.0, 70.0), best_val=None, parent=None, teacher_acc=None, metrics=True, epochs=()):
        from mlflow.entities import Metric, Param

        self.clock += 60_000
        start = self.clock
        all_tags = {"mlflow.runName": f"{mode}-seed{seed}", "git_commit": "synthetic"}
        if mode:
            all_tags.update(mode=mode, dataset="fashion_mnist", student="resnet8",
                            teacher=teacher or ("none" if mode == "nokd" else "resnet20"))
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        all_tags.update(tags or {})
        run = self.client.create_run(self.experiment_id, start_time=start, tags=all_tags)
        values = {**COMMON, "mode": mode, "seed": str(seed), **OWN.get(mode, {}), **(params or {})}
        ms = []
        if metrics:
            ms = [Metric("val_acc", v, start + i, i) for i, v in enumerate(val)]
            ms += [Metric("epoch_seconds", v, start + i, i) for i, v in enumerate(epochs)]
            ms += [Metric("best_val_acc", best_val if best_val is not None else max(val), start, 0)]
            if test_acc is not None:
                ms.append(Metric("test_acc", test_acc, start, 0))
            if teacher_acc is not None:
                ms.append(Metric("teacher_test_acc", teacher_acc, start, 0))
        self.client.log_batch(run.info.run_id, metrics=ms, params=[Param(k, str(v)) for k, v in values.items()])
        if status != "RUNNING":
            self.client.set_terminated(run.info.run_id, status, end_time=start + int(wall * 1000))
        return run.info.run_id


@pytest.fixture()
def synthetic_experiment(tracking, monkeypatch):
    from mlflow import MlflowClient

    clean_mlflow_env(monkeypatch)
    client = MlflowClient(tracking)
    name = unique_experiment("compare")
    s = Synth(client, client.create_experiment(name))
    ids = {}
    ids["nokd_old"] = s.run("nokd", 0, 70.0)                                   # superseded by the next
    ids["nokd0"] = s.run("nokd", 0, 80.0, wall=10.0, val=(60.0, 70.0, 78.0), epochs=(2.0, 3.0, 4.0))
    ids["nokd1"] = s.run("nokd", 1, 82.0, wall=20.0, params={"lr": ".1", "weight_decay": "5e-4"},  # as typed
                         epochs=(4.0, 5.0, 6.0))
    ids["kd0"] = s.run("kd", 0, 85.0, teacher_acc=90.0, wall=30.0, val=(65.0, 75.0, 84.0), epochs=(3.0, 4.0, 5.0))
    # stopped after its first epoch and continued later: the pause is in its wall time only
    ids["kd1"] = s.run("kd", 1, 87.0, teacher_acc=90.0, wall=50.0, epochs=(5.0, 6.0, 7.0))
    ids["kd_failed"] = s.run("kd", 2, 99.0, status="FAILED", teacher_acc=90.0)
    ids["kd_running"] = s.run("kd", 3, 99.0, status="RUNNING", teacher_acc=90.0)
    ids["kd_killed"] = s.run("kd", 4, 99.0, status="KILLED", teacher_acc=90.0)
    ids["kd_epochs"] = s.run("kd", 5, 99.0, params={"epochs": "5"}, teacher_acc=90.0)
    ids["kd_temp"] = s.run("kd", 6, 99.0, params={"temperature": "8.0"}, teacher_acc=90.0)
    ids["rkd0"] = s.run("rkd", 0, 84.0, wall=12.0)
    ids["rkd1"] = s.run("rkd", 1, 85.5, wall=14.0)
    ids["bench"] = s.run("benchmark", 0, None, metrics=False)
    ids["rkd2"] = s.run("rkd", 2, 89.0, wall=16.0, parent=ids["bench"], tags={"benchmark_run_id": ids["bench"]})
    ids["allkd"] = s.run("allkd", 0, 86.0, wall=100.0, val=(), best_val=60.0)  # a parent: no curve of its own
    ids["allkd_child"] = s.run("kd", 0, 99.0, parent=ids["allkd"], tags={"parent_mode": "allkd"},
                               val=(40.0, 50.0, 60.0), epochs=(10.0, 20.0, 30.0))
    ids["allkd_child2"] = s.run("kd", 0, 98.0, parent=ids["allkd"], tags={"parent_mode": "allkd"},
                                epochs=(1.0, 2.0, 3.0))
    s.client.set_tag(ids["allkd"], "selected_run_id", ids["allkd_child"])
    ids["teacher"] = s.run("teacher", 0, 91.0, params={"arch": "resnet20"})
    ids["no_mode"] = s.run("", 0, 50.0)
    ids["old_compare"] = s.run("compare", 0, 1.0)
    return client, name, ids


EXPECTED_LEFT_OUT = {"nokd_old": "duplicate of seed 0", "kd_failed": "status FAILED", "kd_running": "status RUNNING",
                     "kd_killed": "status KILLED", "kd_epochs": "epochs=5", "kd_temp": "temperature=8.0",
                     "teacher": "not a distillation mode", "no_mode": "no mode tag"}


def check_comparison(summary: pd.DataFrame, excluded: pd.DataFrame, ids: dict) -> None:
    rows = {r["mode"]: r for r in summary.to_dict("records")}
    assert list(summary["mode"]) == ["nokd", "allkd", "kd", "rkd"]  # registry order: the baseline, then by name
    groups = {"nokd": [80.0, 82.0], "kd": [85.0, 87.0], "rkd": [84.0, 85.5, 89.0], "allkd": [86.0]}
    for mode, acc in groups.items():
        row = rows[mode]
        assert row["runs"] == len(acc), mode
        assert row["test_acc_mean"] == pytest.approx(sum(acc) / len(acc)), mode
        if len(acc) > 1:
            mean = sum(acc) / len(acc)
            assert row["test_acc_std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)))
        else:
            assert math.isnan(row["test_acc_std"])
    assert rows["nokd"]["wall_seconds_mean"] == pytest.approx(15.0)
    assert rows["kd"]["wall_seconds_mean"] == pytest.approx(40.0)
    # the epochs' times: kd (3+4+5 and 5+6+7), allkd's two stages summed (60 + 6); rkd's
    # runs logged none, so it has no mean of some seeds only
    assert (rows["nokd"]["train_seconds_mean"], rows["kd"]["train_seconds_mean"]) == (12.0, 15.0)
    assert rows["allkd"]["train_seconds_mean"] == 66.0 and math.isnan(rows["rkd"]["train_seconds_mean"])
    assert rows["rkd"]["seeds"] == "0,1,2"  # the benchmark child counts
    assert rows["kd"]["best_val_acc_max"] == pytest.approx(84.0)
    assert rows["kd"]["teacher_test_acc"] == pytest.approx(90.0)
    # kd vs nokd: both variances 2, n = 2 => Welch df = 2, t_{0.975, 2} in closed form
    half = T975[2] * math.sqrt(2.0 / 2 + 2.0 / 2)
    assert rows["kd"]["gain_vs_nokd"] == pytest.approx(5.0)
    assert rows["kd"]["gain_df"] == pytest.approx(2.0)
    assert rows["kd"]["gain_ci_low"] == pytest.approx(5.0 - half)
    assert rows["kd"]["gain_ci_high"] == pytest.approx(5.0 + half)
    # two modes with an interval against the same nokd: Holm-adjusted p-values
    assert [rows[m]["gain_p_holm"] for m in ("kd", "rkd")] == pytest.approx(holm([rows["kd"]["gain_p"],
                                                                                 rows["rkd"]["gain_p"]]))
    assert rows["kd"]["gain_p_holm"] >= rows["kd"]["gain_p"] and math.isnan(rows["allkd"]["gain_p_holm"])
    # rkd vs nokd: unequal n and variances, Welch-Satterthwaite df by hand
    va, vb = statistics.variance(groups["rkd"]) / 3, statistics.variance(groups["nokd"]) / 2
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    assert rows["rkd"]["gain_df"] == pytest.approx(df)
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    gain = statistics.fmean(groups["rkd"]) - 81.0
    assert (rows["rkd"]["gain_ci_low"], rows["rkd"]["gain_ci_high"]) == (pytest.approx(gain - half),
                                                                           pytest.approx(gain + half))
    # the paired test on the seeds both have: rkd's 0 and 1 (differences 4 and 3.5), df 1
    assert (rows["rkd"]["paired_seeds"], rows["rkd"]["paired_gain"]) == ("0,1", pytest.approx(3.75))
    assert rows["rkd"]["paired_ci_low"] == pytest.approx(3.75 - T975[1] * 0.25)
    assert rows["kd"]["gain_test"] == rows["rkd"]["gain_test"] == "paired"
    # a single seed: the gain, but no interval; nokd itself has no gain
    assert rows["allkd"]["gain_vs_nokd"] == pytest.approx(5.0) and math.isnan(rows["allkd"]["gain_ci_low"])
    assert math.isnan(rows["nokd"]["gain_vs_nokd"])
    # every run left out is listed with its reason; bookkeeping and stage runs are not runs of a mode
    reasons = dict(zip(excluded["run_id"], excluded["reason"]))
    assert set(reasons) == {ids[k] for k in EXPECTED_LEFT_OUT}
    for key, reason in EXPECTED_LEFT_OUT.items():
        assert reason in reasons[ids[key]], (key, reasons[ids[key]])


def test_compare_statistics_exclusions_and_logged_artifacts(synthetic_experiment, tmp_path):
    client, name, ids = synthetic_experiment
    direct = compare_experiment(name, client)
    check_comparison(direct.summary, direct.excluded, ids)
    assert set(direct.runs["run_id"]) == {ids[k] for k in ("nokd0", "nokd1", "kd0", "kd1", "rkd0", "rkd1", "rkd2",
                                                           "allkd")}
    # the val_acc curves: each run's own history; a multi-stage parent: its selected child's
    curves = direct.histories
    assert sorted(curves.loc[curves["run_id"] == ids["kd0"], "val_acc"]) == [65.0, 75.0, 84.0]
    assert sorted(curves.loc[curves["run_id"] == ids["allkd"], "val_acc"]) == [40.0, 50.0, 60.0]
    assert sorted(curves["epoch"].unique()) == [1, 2, 3]

    written = tmp_path / "written"
    out = CliRunner().invoke(main, ["compare", "--experiment", name, "--output-dir", str(written)])
    assert out.exit_code == 0, out.output
    check_comparison(pd.read_csv(written / "summary.csv"), pd.read_csv(written / "excluded.csv"), ids)
    runs = pd.read_csv(written / "runs.csv")
    assert len(runs) == 8 and {ids["nokd0"], ids["kd0"]} <= set(runs["run_id"]) and "test_acc_last" in runs
    for figure in ("test_acc_by_mode.png", "val_acc_curves.png"):
        assert (written / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fashion_mnist | resnet8 | kd | resnet20 | 2 | 86.00 ± 1.41 |" in out.output
    # seeds 0 and 1 of kd and nokd share their splits: the table shows the paired test (both
    # differences are 5, so its interval is a point), summary.csv keeps Welch's beside it
    assert "+5.00 [+5.00, +5.00] | paired (0,1) |" in out.output
    assert "+3.75 [" in out.output  # rkd: its seeds 0 and 1 pair with nokd's, seed 2 has no partner
    assert "8 run(s) record no code_version" in out.output  # synthetic runs, logged without provenance
    assert "Left out (8 runs)" in out.output and ids["kd_failed"] in out.output
    assert "| wall time (s) |" in out.output  # rkd's runs logged no epoch times

    exp = client.get_experiment_by_name(name)
    compares = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mode") == "compare"
                and r.info.run_id != ids["old_compare"]]
    assert len(compares) == 1 and compares[0].info.status == "FINISHED"
    run_id = compares[0].info.run_id
    listed = {a.path for a in client.list_artifacts(run_id, "compare")} | \
        {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"compare/summary.csv", "compare/summary.md", "compare/excluded.csv", "compare/runs.csv",
            "figures/test_acc_by_mode.png", "figures/val_acc_curves.png"} <= listed
    local = tmp_path / "artifacts"
    local.mkdir()
    summary = pd.read_csv(client.download_artifacts(run_id, "compare/summary.csv", str(local)))
    excluded = pd.read_csv(client.download_artifacts(run_id, "compare/excluded.csv", str(local)))
    check_comparison(summary, excluded, ids)
    markdown = open(client.download_artifacts(run_id, "compare/summary.md", str(local))).read()
    assert "| fashion_mnist | resnet8 | rkd | resnet20 | 3 |" in markdown and ids["kd_temp"] in markdown
    for figure in ("figures/test_acc_by_mode.png", "figures/val_acc_curves.png"):
        with open(client.download_artifacts(run_id, figure, str(local)), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert compares[0].data.metrics["runs_compared"] == 8 and compares[0].data.metrics["runs_left_out"] == 8

    # a later comparison skips the compare runs and finds the same numbers
    again = compare_experiment(name, client, histories=False)
    check_comparison(again.summary, again.excluded, ids)


# ------------------------------------------------------------ benchmark smoke run
BENCH = {"modes": "nokd,kd", "seeds": 1, "epochs": 1, "train_subset": 500, "val_size": 200, "test_subset": 300,
         "batch_size": 100, "device": "cpu"}


def test_benchmark_runs_nested_pairs_then_compares_and_resumes(tracking, tmp_path, monkeypatch):
    from kd_mlflow.checkpoint import save_model_checkpoint
    from kd_mlflow.models import create_model

    clean_mlflow_env(monkeypatch)
    ckpt = save_model_checkpoint(tmp_path / "teacher.pt", create_model("resnet8", 10, 1),
                                 {"arch": "resnet8", "dataset": "fashion_mnist", "num_classes": 10,
                                  "in_channels": 1, "test_acc": 12.5})
    experiment = unique_experiment("benchmark")
    # --jobs 2 --threads 1: the two cells train at once on a local Ray, one CPU each.
    params = {**BENCH, "teacher_checkpoint": ckpt, "jobs": 2, "threads": 1}
    proc = mlflow_run("benchmark", tracking, experiment, params)
    assert "| fashion_mnist | resnet8 | kd | resnet8 | 1 |" in proc.stdout, proc.stdout[-3000:]
    assert "Ray (local)" in proc.stdout
    assert len(re.findall(r": training \(1 CPU\)", proc.stdout)) == 2, proc.stdout[-3000:]

    client, runs = runs_of(tracking, experiment)
    parents = [r for r in runs if r.data.tags.get("mode") == "benchmark"]
    assert len(parents) == 1  # the run `mlflow run` created, adopted
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("mlflow.project.entryPoint") == "benchmark"
    assert parent.data.metrics["pairs_trained"] == 2 and parent.data.metrics["pairs_skipped"] == 0
    assert parent.data.params["jobs"] == "2"
    pairs = [r for r in runs if r.data.tags.get("mode") in ("nokd", "kd")]
    assert sorted(r.data.tags["mode"] for r in pairs) == ["kd", "nokd"]
    for r in pairs:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.params["seed"] == "0" and r.data.params["epochs"] == "1"
        assert r.data.params["train_subset"] == "500" and 0 <= r.data.metrics["test_acc"] <= 100
        assert r.data.tags["git_commit"] and r.data.tags["benchmark_run_id"] == parent.info.run_id
        assert len(client.get_metric_history(r.info.run_id, "val_acc")) == 1
        assert not client.search_model_versions(f"run_id='{r.info.run_id}'")  # measurements, not registered
    kd = next(r for r in pairs if r.data.tags["mode"] == "kd")
    assert kd.data.tags["teacher"] == "resnet8" and kd.data.metrics["teacher_test_acc"] == pytest.approx(12.5)
    compares = [r for r in runs if r.data.tags.get("mode") == "compare"]
    assert len(compares) == 1 and compares[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["compare_run_id"] == compares[0].info.run_id
    summary = pd.read_csv(client.download_artifacts(compares[0].info.run_id, "compare/summary.csv", str(tmp_path)))
    assert list(summary["mode"]) == ["nokd", "kd"] and list(summary["runs"]) == [1, 1]
    by_mode = {r.data.tags["mode"]: r.data.metrics["test_acc"] for r in pairs}
    assert list(summary["test_acc_mean"]) == [pytest.approx(by_mode["nokd"]), pytest.approx(by_mode["kd"])]

    # The same benchmark again, launched directly: everything is finished, nothing is trained.
    cmd = [str(BIN / "kd-mlflow"), "benchmark", "--experiment", experiment]
    for k, v in params.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count(": skipped, finished as run") == 2 and ": training" not in again.stdout
    _, after = runs_of(tracking, experiment)
    assert sorted(r.info.run_id for r in after if r.data.tags.get("mode") in ("nokd", "kd")) == \
        sorted(r.info.run_id for r in pairs)
    second = [r for r in after if r.data.tags.get("mode") == "benchmark" and r.info.run_id != parent.info.run_id]
    assert len(second) == 1 and second[0].data.metrics["pairs_skipped"] == 2
    assert second[0].data.metrics["pairs_trained"] == 0
    assert not [r for r in after if r.data.tags.get("mlflow.parentRunId") == second[0].info.run_id
                and r.data.tags.get("mode") != "compare"]


def test_sigterm_stops_a_jobs_benchmark_and_its_workers_with_every_run_killed(tmp_path):
    """A real SIGTERM to `kd-mlflow benchmark --jobs 2` while both cells train on its local
    Ray: it exits 143, none of the processes it started (Ray's and the cells') outlives it,
    and no run stays RUNNING."""
    import signal
    import time

    import psutil
    from mlflow import MlflowClient

    from kd_mlflow.checkpoint import save_model_checkpoint
    from kd_mlflow.models import create_model

    ckpt = save_model_checkpoint(tmp_path / "teacher.pt", create_model("resnet8", 10, 1),
                                 {"arch": "resnet8", "dataset": "fashion_mnist", "num_classes": 10,
                                  "in_channels": 1, "test_acc": 12.5})
    tracking = sqlite_store(tmp_path, "jobs.db")
    cmd = [str(BIN / "kd-mlflow"), "benchmark", "--jobs", "2", "--threads", "1", "--experiment", "jobs-sigterm",
           "--teacher_checkpoint", str(ckpt)]
    for k, v in {**BENCH, "epochs": 200}.items():
        cmd += [f"--{k}", str(v)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": tracking},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while len(list((tmp_path / "runs").glob("*/last.pt"))) < 2:  # both cells past their first epoch
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM" in out and "marked KILLED" in out
    time.sleep(2)
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("jobs-sigterm").experiment_id])
    assert sorted(r.data.tags["mode"] for r in runs) == ["benchmark", "kd", "nokd"]
    assert {r.info.status for r in runs} == {"KILLED"}


# ----------------------------------------------------------------------- registry
def test_champion_alias_follows_test_acc_and_pull_reproduces_it(tracking, tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow import MlflowClient

    from kd_mlflow.config import Config
    from kd_mlflow.data import DATASETS, load_arrays
    from kd_mlflow.tracking.registry import CHAMPION, update_champion
    from kd_mlflow.runner import run

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)  # runs/ checkpoints
    client = MlflowClient(tracking)
    name = unique_experiment("registry")
    tiny = dict(epochs=1, val_size=200, test_subset=300, device="cpu", precision="fp32", experiment=name,
                registered_model=name)
    # a barely trained student first, then a better one (Adam, more steps)
    weak = run(Config.for_mode("nokd", **tiny, train_subset=200, batch_size=100, lr=1e-5).validate())
    assert update_champion(client, name) == weak.version == 1
    strong = run(Config.for_mode("nokd", **tiny, train_subset=1000, batch_size=50, optimizer="adamw",
                                 lr=0.002).validate())
    assert strong.version == 2 and strong.test_acc > weak.test_acc + 5, (weak.test_acc, strong.test_acc)
    assert update_champion(client, name) == 2
    # a worse version landing later does not take the alias
    worse = mlflow.register_model(weak.model_uri, name)
    assert int(worse.version) == 3 and update_champion(client, name) == 2
    assert client.get_model_version_by_alias(name, CHAMPION).version == "2"

    listing = CliRunner().invoke(main, ["models", "list", "--name", name])
    assert listing.exit_code == 0, listing.output
    lines = {int(line.split()[1]): line for line in listing.output.splitlines()[1:]}
    assert set(lines) == {1, 2, 3}
    assert CHAMPION in lines[2] and CHAMPION not in lines[1] + lines[3]
    assert " nokd " in lines[2] and f"{strong.test_acc:.2f}" in lines[2] and f"{weak.test_acc:.2f}" in lines[3]

    # pull the champion in a fresh process, load it here, measure it on the real test split
    out = tmp_path / "pulled"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    pulled = subprocess.run([str(BIN / "kd-mlflow"), "models", "pull", f"{name}@{CHAMPION}", "-o", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert f"models:/{name}/2" in pulled.stdout
    model = mlflow.pytorch.load_model(str(out))
    logged = client.get_run(client.get_model_version(name, "2").run_id).data.metrics["test_acc"]
    assert logged == pytest.approx(strong.test_acc)
    _, _, x, y = load_arrays("fashion_mnist")
    n = tiny["test_subset"]
    info = DATASETS["fashion_mnist"]
    x = (torch.tensor(x[:n]).float() - torch.tensor(info.mean).view(1, -1, 1, 1) * 255) / (
        torch.tensor(info.std).view(1, -1, 1, 1) * 255)
    y = torch.tensor(y[:n]).long()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 100]).argmax(1) for i in range(0, n, 100)])
    # the pulled champion reproduces the logged count of correct images exactly
    metrics = client.get_run(client.get_model_version(name, "2").run_id).data.metrics
    assert (int((pred == y).sum()), n) == (int(metrics["test_correct"]), int(metrics["test_images"]))

    # bad specs fail with one line and exit 2, before touching the output directory
    bad = CliRunner().invoke(main, ["models", "pull", f"{name}/99", "-o", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "kd-mlflow models list" in bad.output
    assert not (tmp_path / "nothing").exists()
