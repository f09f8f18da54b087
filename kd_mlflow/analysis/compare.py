"""MLflow runs -> pandas -> the cross-mode comparison (tables and figures).

``compare_experiment(name)`` reads every run of an experiment through the MLflow API
and reduces it to one row per (dataset, student, mode, teacher): how many runs (seeds),
mean and standard deviation of ``test_acc``, best validation accuracy, mean wall time and
training time (the sum of the epochs' times, which a stop and a later continuation do not
inflate), and the gain over ``nokd`` (same dataset and student) with a 95% confidence interval:
paired on the seeds both share (seed k fixes the split and the batch order for every
mode) where there are at least two, and Welch's where both groups have at least two
seeds; both are reported, and Holm adjusts each test's p-values across the modes. ``log_comparison`` stores the
result as a run of its own (tag ``mode=compare``, which later comparisons skip).
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import ConfigError
from ..modes import BASELINE, DISTILLATION_MODES
from ..tracking import shown_tracking_uri
from ..tracking.queries import client as tracking_client
from ..tracking.queries import experiment_of_run, find_experiment, search_all_runs
from .report import comparison_markdown, log_comparison, write_comparison
from .runs import EXCLUDED_COLUMNS, PROVENANCE, counted_runs, runs_frame, select_runs
from .statistics import CONFIDENCE, holm, paired_interval, welch_interval

SUMMARY_COLUMNS = ["dataset", "student", "mode", "teacher", "runs", "seeds", "test_acc_mean", "test_acc_std",
                   "best_val_acc_mean", "best_val_acc_max", "wall_seconds_mean", "train_seconds_mean",
                   "teacher_test_acc",
                   "gain_vs_nokd", "gain_ci_low", "gain_ci_high", "gain_df", "gain_p", "gain_p_holm",
                   "test_acc_last_mean", "test_acc_last_std", "gain_last_vs_nokd", "gain_last_ci_low",
                   "gain_last_ci_high", "paired_seeds", "paired_gain", "paired_ci_low", "paired_ci_high",
                   "paired_p", "paired_p_holm", "gain_test"]


@dataclass
class Comparison:
    experiment: str
    experiment_id: str
    summary: pd.DataFrame
    runs: pd.DataFrame          # the runs that were averaged, one row each
    excluded: pd.DataFrame      # the runs left out, with the reason
    settings: dict              # the majority's common settings
    histories: pd.DataFrame = field(default_factory=pd.DataFrame)  # val_acc per epoch of the included runs

    @property
    def markdown(self) -> str:
        return comparison_markdown(self)


def _mode_order(mode: str) -> int:
    return DISTILLATION_MODES.index(mode) if mode in DISTILLATION_MODES else len(DISTILLATION_MODES)


def summarize(frame: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per (dataset, student, mode, teacher) of the included runs."""
    rows = []
    keys = ["dataset", "student", "mode", "teacher"]
    if "train_seconds" not in frame.columns:
        frame = frame.assign(train_seconds=math.nan)
    for key, g in frame.groupby(keys, sort=False):
        acc = g["test_acc"].tolist()
        last = g["test_acc_last"].dropna().tolist()
        teacher_acc = g["teacher_test_acc"].dropna()
        rows.append({**dict(zip(keys, key)), "runs": len(g),
                     "seeds": ",".join(str(s) for s in sorted(g["seed"].dropna().astype(int))),
                     "test_acc_mean": statistics.fmean(acc),
                     "test_acc_std": statistics.stdev(acc) if len(acc) >= 2 else math.nan,
                     "test_acc_last_mean": statistics.fmean(last) if last else math.nan,
                     "test_acc_last_std": statistics.stdev(last) if len(last) >= 2 else math.nan,
                     "best_val_acc_mean": g["best_val_acc"].mean(), "best_val_acc_max": g["best_val_acc"].max(),
                     "wall_seconds_mean": g["wall_seconds"].mean(),
                     # NaN unless every run has it (a mean over some seeds would not compare)
                     "train_seconds_mean": g["train_seconds"].mean() if g["train_seconds"].notna().all() else math.nan,
                     "teacher_test_acc": teacher_acc.mean() if len(teacher_acc) else math.nan,
                     "_acc": acc, "_last": last,
                     "_by_seed": {int(s): a for s, a in zip(g["seed"], g["test_acc"]) if not pd.isna(s)}})
    for row in rows:
        row.update({k: math.nan for k in ("gain_vs_nokd", "gain_ci_low", "gain_ci_high", "gain_df", "gain_p",
                                          "gain_p_holm", "gain_last_vs_nokd", "gain_last_ci_low",
                                          "gain_last_ci_high", "paired_gain", "paired_ci_low", "paired_ci_high",
                                          "paired_p", "paired_p_holm")}, paired_seeds="", gain_test="")
        if row["mode"] == BASELINE:
            continue
        base = [b for b in rows if b["mode"] == BASELINE and b["dataset"] == row["dataset"]
                and b["student"] == row["student"]]
        if not base:
            continue
        row["gain_vs_nokd"] = row["test_acc_mean"] - base[0]["test_acc_mean"]
        ci = welch_interval(row["_acc"], base[0]["_acc"], confidence)
        if ci is not None:
            row.update(gain_ci_low=ci.low, gain_ci_high=ci.high, gain_df=ci.df, gain_p=ci.p, gain_test="welch")
        # The runs compared share their common settings (select_runs), so seed k of every
        # mode saw the same split and batch order: on the seeds both have, the paired test.
        paired = paired_interval(row["_by_seed"], base[0]["_by_seed"], confidence)
        if paired is not None:
            row.update(paired_seeds=",".join(str(k) for k in sorted(set(row["_by_seed"]) & set(base[0]["_by_seed"]))),
                       paired_gain=paired.diff, paired_ci_low=paired.low, paired_ci_high=paired.high,
                       paired_p=paired.p, gain_test="paired")
        if row["_last"] and base[0]["_last"]:
            row["gain_last_vs_nokd"] = row["test_acc_last_mean"] - base[0]["test_acc_last_mean"]
            ci = welch_interval(row["_last"], base[0]["_last"], confidence)
            if ci is not None:
                row.update(gain_last_ci_low=ci.low, gain_last_ci_high=ci.high)
    # Every mode is tested against the same nokd: Holm keeps the family-wise error at 5%
    # across them (per dataset and student).
    for group in {(r["dataset"], r["student"]) for r in rows}:
        members = [r for r in rows if (r["dataset"], r["student"]) == group]
        for r, p, q in zip(members, holm([r["gain_p"] for r in members]), holm([r["paired_p"] for r in members])):
            r["gain_p_holm"], r["paired_p_holm"] = p, q
    rows.sort(key=lambda r: (r["dataset"], r["student"], _mode_order(r["mode"]), r["teacher"]))
    for row in rows:
        del row["_acc"], row["_last"], row["_by_seed"]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def val_acc_histories(client, frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in frame.itertuples():
        for m in client.get_metric_history(r.history_run_id, "val_acc"):
            rows.append({"run_id": r.run_id, "mode": r.mode, "teacher": r.teacher, "seed": r.seed,
                         "epoch": m.step + 1, "val_acc": m.value})
    return pd.DataFrame(rows, columns=["run_id", "mode", "teacher", "seed", "epoch", "val_acc"])


def train_seconds(client, runs: list, frame: pd.DataFrame) -> list[float]:
    """Per run of ``frame``: the sum of its epochs' times (``epoch_seconds``: training and
    validation), and for a multi-stage run the sum over its stages. Unlike the wall time
    (end - start), this leaves out start-up and export, and the time a run spent stopped
    before the same command continued it. NaN where a run logged no epoch time."""
    children: dict[str, list[str]] = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent and r.data.tags.get("parent_mode"):
            children.setdefault(parent, []).append(r.info.run_id)
    has_epochs = {r.info.run_id for r in runs if "epoch_seconds" in r.data.metrics}

    def seconds(run_id: str) -> float:
        if run_id in has_epochs:
            # one value per epoch; a continued run starts after its last finished epoch
            by_epoch = {m.step: m.value for m in client.get_metric_history(run_id, "epoch_seconds")}
            return float(sum(by_epoch.values()))
        stages = [seconds(child) for child in children.get(run_id, [])]
        return float(sum(stages)) if stages else math.nan

    return [seconds(run_id) for run_id in frame["run_id"]]


def compare_experiment(experiment: str, client=None, *, skip_run_ids=(), histories: bool = True) -> Comparison:
    """Read ``experiment`` (a name, or an id) and compare its modes."""
    client = client or tracking_client()
    exp = find_experiment(client, experiment)
    if exp is None:
        raise ConfigError(f"experiment {experiment!r} does not exist at {shown_tracking_uri()}; "
                          f"pass the name of an experiment with runs (see the MLflow UI)")
    every_run = search_all_runs(client, exp.experiment_id)
    included, excluded, settings = select_runs(counted_runs(every_run, skip_run_ids))
    frame = runs_frame(included)
    frame["train_seconds"] = train_seconds(client, every_run, frame)
    excluded_frame = pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS)
    return Comparison(exp.name, exp.experiment_id, summarize(frame), frame, excluded_frame, settings,
                      val_acc_histories(client, frame) if histories else pd.DataFrame())


def compare_runs_csv(path: str) -> Comparison:
    """The comparison of a ``runs.csv`` that ``compare --output-dir`` wrote (the committed
    benchmark's, say), recomputed without MLflow: its included runs, summarised again with
    this version's statistics. Nothing is left out again: the CSV holds the included runs."""
    try:
        frame = pd.read_csv(path, dtype={"run_id": str, "parent_run_id": str, "history_run_id": str})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read runs CSV {path!r}: {exc}; pass a runs.csv written by "
                          f"kd-mlflow compare --output-dir") from None
    needed = {"dataset", "student", "mode", "teacher", "seed", "test_acc", "test_acc_last", "best_val_acc",
              "teacher_test_acc", "wall_seconds"}
    missing = sorted(needed - set(frame.columns))
    if missing:
        raise ConfigError(f"{path} lacks the column(s) {', '.join(missing)}; pass a runs.csv written by "
                          f"kd-mlflow compare --output-dir")
    for name in PROVENANCE:
        if name not in frame.columns:
            frame[name] = ""
    frame[list(PROVENANCE)] = frame[list(PROVENANCE)].fillna("").astype(str)
    name = Path(path).name
    return Comparison(name, "", summarize(frame), frame, pd.DataFrame(columns=EXCLUDED_COLUMNS), {})


def run_compare(experiment: str = "", *, echo=print, output_dir: str = "") -> Comparison:
    """``kd-mlflow compare``: compare ``experiment`` and log the result as a run of its
    own (tag mode=compare), and into ``output_dir`` when given. Under ``mlflow run`` the
    run MLflow created is adopted, and an empty ``experiment`` means that run's experiment."""
    from ..tracking import check_tracking_server, start_run

    check_tracking_server()  # unreachable or refused: one line at once, not MLflow's minutes of retries
    adopted = os.environ.get("MLFLOW_RUN_ID")
    if not experiment:
        if adopted:
            experiment = experiment_of_run(tracking_client(), adopted)[0]
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
    if not experiment:
        raise ConfigError("no experiment to compare; pass --experiment NAME (or -P experiment=NAME)")
    client = tracking_client()
    comparison = compare_experiment(experiment, client)  # fails before any run exists on a bad name
    target = "" if adopted else comparison.experiment
    with start_run({"experiment": target}, {"mode": "compare"}, run_name=f"compare-{comparison.experiment}") as tracker:
        if adopted and client.get_run(tracker.run_id).info.experiment_id != comparison.experiment_id:
            echo(f"note: this compare run lives in another experiment than {comparison.experiment!r}; "
                 f"pass --experiment-name {comparison.experiment} to `mlflow run` to keep them together")
        # Re-read inside the run so nothing finished in between is missed; skip ourselves.
        comparison = compare_experiment(comparison.experiment, client, skip_run_ids={tracker.run_id})
        log_comparison(comparison, tracker)
        if output_dir:
            write_comparison(comparison, Path(output_dir), figures=True)
        echo(comparison.markdown)
        echo(f"compare run {tracker.run_id} (compared experiment {comparison.experiment!r})")
    return comparison
