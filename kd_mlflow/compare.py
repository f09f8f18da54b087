"""MLflow runs -> pandas -> the cross-mode comparison (tables and figures).

``compare_experiment(name)`` reads every run of an experiment through the MLflow API
and reduces it to one row per (dataset, student, mode, teacher): how many runs (seeds),
mean and standard deviation of ``test_acc``, best validation accuracy, mean wall time,
and the gain over ``nokd`` (same dataset and student) with a 95% confidence interval:
paired on the seeds both share (seed k fixes the split and the batch order for every
mode) where there are at least two, and Welch's where both groups have at least two
seeds; both are reported, and Holm adjusts each test's p-values across the modes. ``log_comparison`` stores the
result as a run of its own (tag ``mode=compare``, which later comparisons skip).

Which runs count:

* top-level runs, plus the (mode, seed) children of a ``benchmark`` run; a multi-stage
  run (allkd, kdparam, takd) counts once, as its parent; its stage children (tagged
  ``parent_mode``) never count on their own;
* ``compare`` and ``benchmark`` runs themselves are bookkeeping and are ignored;
* everything else that cannot be averaged honestly is left out *and listed* with the
  reason: runs that FAILED, are still RUNNING or were KILLED, runs without ``test_acc``,
  runs that are not distillation runs (``teacher``, no ``mode`` tag), runs whose
  common settings (:data:`COMMON_SETTINGS`) differ from the majority of the runs, runs
  whose mode-specific parameters differ from the majority of their mode, and older
  duplicates of the same (mode, teacher, seed).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import Config, ConfigError
from .tracking import shown_tracking_uri
from .modes import BASELINE, DISTILLATION_MODES, EXECUTION, MODES, OPTIM

# Settings every mode has and that must agree for numbers to be comparable across
# modes (seed varies by design; mode-specific parameters are checked per mode).
COMMON_SETTINGS = ("dataset", "student", "train_subset", "val_size", "test_subset", *OPTIM)
# Where and how a run ran, not what it computed; never a reason to exclude a run.
NOT_SETTINGS = {*EXECUTION, "mode", "seed", "teacher", "teacher_checkpoint", "compared_experiment"}
BOOKKEEPING_MODES = {"compare", "benchmark", "sweep"}
CONFIDENCE = 0.95

SUMMARY_COLUMNS = ["dataset", "student", "mode", "teacher", "runs", "seeds", "test_acc_mean", "test_acc_std",
                   "best_val_acc_mean", "best_val_acc_max", "wall_seconds_mean", "teacher_test_acc",
                   "gain_vs_nokd", "gain_ci_low", "gain_ci_high", "gain_df", "gain_p", "gain_p_holm",
                   "test_acc_last_mean", "test_acc_last_std", "gain_last_vs_nokd", "gain_last_ci_low",
                   "gain_last_ci_high", "paired_seeds", "paired_gain", "paired_ci_low", "paired_ci_high",
                   "paired_p", "paired_p_holm", "gain_test"]
EXCLUDED_COLUMNS = ["run_id", "run_name", "mode", "teacher", "seed", "status", "reason"]


# ------------------------------------------------------------------- statistics
def t_cdf(t: float, df: float) -> float:
    """Student-t CDF for real df > 0 (``scipy.stats.t.cdf``)."""
    from scipy import stats

    return float(stats.t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile, ``scipy.stats.t.ppf`` (scipy comes with mlflow): Welch's
    non-integer degrees of freedom need no table or normal approximation."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


@dataclass
class Interval:
    diff: float
    low: float
    high: float
    df: float
    p: float = math.nan  # two-sided Welch t-test p-value of "no difference"


def welch_interval(a, b, confidence: float = CONFIDENCE) -> Interval | None:
    """CI of mean(a) - mean(b) without assuming equal variances (Welch-Satterthwaite df);
    None unless both samples have >= 2 values."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se2 = va + vb
    if se2 == 0.0:
        return Interval(diff, diff, diff, math.inf, 1.0 if diff == 0 else 0.0)
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, df) * math.sqrt(se2)
    p = 2.0 * t_cdf(-abs(diff) / math.sqrt(se2), df)
    return Interval(diff, diff - half, diff + half, df, min(1.0, p))


def paired_interval(a: dict, b: dict, confidence: float = CONFIDENCE) -> Interval | None:
    """CI of the mean of a[seed] - b[seed] over the seeds both have (a paired t interval,
    df = n - 1): the design when seed k of every mode trains on the same split in the same
    batch order. None unless at least 2 seeds match."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n, mean = len(d), statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(n)
    if se == 0.0:
        return Interval(mean, mean, mean, n - 1, 1.0 if mean == 0 else 0.0)
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * se
    p = 2.0 * t_cdf(-abs(mean) / se, n - 1)
    return Interval(mean, mean - half, mean + half, n - 1, min(1.0, p))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (NaN ones are left out and stay NaN):
    the i-th smallest becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m, adjusted, running = len(order), [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


# --------------------------------------------------------------- reading runs
def normalize_value(value) -> str:
    """Param values as comparable strings: '.1', '0.1' and '1e-1' are the same lr, and
    ``''`` is the empty string (``mlflow run`` logs parameters as the user typed them,
    and an empty value as two quotes)."""
    text = "" if value is None else str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        return repr(float(text))
    except ValueError:
        return text


def logged_value(run, name: str, mode: str = "") -> str:
    """``run``'s param ``name``, normalised. A param the run does not have, though its mode
    takes it, counts as the parameter's declared default: the run was logged before the
    parameter existed (say ``logit_standardization`` on kd), when the method behaved as that
    default does. So adding a parameter to a mode keeps its earlier runs comparable and a
    benchmark resumable. (Should a parameter's default ever change, its old runs would be
    read with the new default: change a default only together with a new name.)"""
    params = run.data.params
    if name in params:
        return normalize_value(params[name])
    mode = mode or params.get("mode") or run.data.tags.get("mode", "")
    if mode in MODES:
        old = next((o for o, new in MODES[mode].renamed if new == name and o in params), None)
        if old is not None:  # logged before the parameter was renamed
            return normalize_value(params[old])
    if mode in MODES and name in MODES[mode].fields:
        return normalize_value(Config.parameter(name, mode).default)
    return normalize_value(None)


def search_all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def counted_runs(runs: list, skip_run_ids=()) -> list:
    """The runs that stand for one training of a mode: top-level runs and the children
    of benchmarks and sweeps (stage children and bookkeeping runs are dropped here, silently)."""
    by_id = {r.info.run_id: r for r in runs}
    out = []
    for r in runs:
        tags = r.data.tags
        if r.info.run_id in skip_run_ids or tags.get("mode") in BOOKKEEPING_MODES:
            continue
        if tags.get("mlflow.project.entryPoint") in BOOKKEEPING_MODES and not tags.get("mode"):
            continue
        if tags.get("parent_mode"):
            continue  # a stage of a multi-stage run: counted through its parent
        parent = tags.get("mlflow.parentRunId")
        if parent:
            parent_run = by_id.get(parent)
            if parent_run is None or parent_run.data.tags.get("mode") not in ("benchmark", "sweep"):
                continue
        out.append(r)
    return out


def _seed(run) -> int | None:
    try:
        return int(float(run.data.params.get("seed", "")))
    except ValueError:
        return None


def _keep_majority(runs: list, names, key, what: str, excluded: list) -> list:
    """The runs whose ``key`` (values of ``names``) is the majority's, in order; each other
    run goes to ``excluded`` with the differing values as its reason."""
    reference = _majority([key(r) for r in runs])
    kept = []
    for r in runs:
        if key(r) == reference:
            kept.append(r)
        else:
            excluded.append(_row(r, reason=f"different {what}: " + _differences(names, key(r), reference)))
    return kept


def _majority(values: list[tuple]) -> tuple | None:
    """The most common value; ties go to the one seen first (the oldest run)."""
    if not values:
        return None
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _differences(names, values: tuple, reference: tuple) -> str:
    return ", ".join(f"{n}={v or '(unset)'} (majority {r or '(unset)'})"
                     for n, v, r in zip(names, values, reference) if v != r)


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


def _row(run, **extra) -> dict:
    tags = run.data.tags
    return {"run_id": run.info.run_id, "run_name": tags.get("mlflow.runName", run.info.run_name or ""),
            "mode": tags.get("mode", ""), "teacher": tags.get("teacher", ""), "seed": _seed(run),
            "status": run.info.status, **extra}


def _mode_specific(run) -> tuple[str, ...]:
    """The run's own parameters, by their current names."""
    mode = MODES.get(run.data.tags.get("mode", ""))
    names = (k for k in run.data.params if k not in NOT_SETTINGS and k not in COMMON_SETTINGS)
    return tuple(sorted(mode.current_name(k) if mode else k for k in names))


def select_runs(runs: list) -> tuple[list, list[dict], dict]:
    """-> (included runs, excluded rows with reasons, majority settings)."""
    excluded, candidates = [], []
    for r in runs:
        mode = r.data.tags.get("mode", "")
        if r.info.status != "FINISHED":
            excluded.append(_row(r, reason=f"status {r.info.status}: only FINISHED runs are averaged"))
        elif not mode:
            excluded.append(_row(r, reason="no mode tag: not a kd-mlflow run"))
        elif mode not in DISTILLATION_MODES:
            excluded.append(_row(r, reason=f"mode {mode} is not a distillation mode"))
        elif "test_acc" not in r.data.metrics:
            excluded.append(_row(r, reason="no test_acc metric"))
        else:
            candidates.append(r)

    def common(r):
        return tuple(logged_value(r, n) for n in COMMON_SETTINGS)

    agreeing = _keep_majority(candidates, COMMON_SETTINGS, common, "settings", excluded)
    # Shown as the runs logged them (the comparison itself uses the normalised values).
    settings = {n: agreeing[0].data.params.get(n, "") for n in COMMON_SETTINGS} if agreeing else {}

    # Within a mode, its own parameters (temperature, alpha, pkd_weight, ...) must agree too.
    by_mode: dict[tuple, list] = {}
    for r in agreeing:
        by_mode.setdefault((r.data.tags["mode"], r.data.tags.get("teacher", "")), []).append(r)
    consistent = []
    for group in by_mode.values():
        names = sorted(set().union(*(_mode_specific(r) for r in group)))

        def own(r, names=names):
            return tuple(logged_value(r, n, r.data.tags["mode"]) for n in names)

        consistent += _keep_majority(group, names, own, "mode parameters", excluded)

    # The same seed twice adds no information and would understate the spread: keep the newest.
    newest: dict[tuple, object] = {}
    for r in sorted(consistent, key=lambda r: r.info.start_time or 0):
        key = (r.data.tags["mode"], r.data.tags.get("teacher", ""), _seed(r))
        if key in newest:
            old = newest[key]
            excluded.append(_row(old, reason=f"duplicate of seed {key[2]}: run {r.info.run_id} is newer"))
        newest[key] = r
    included = sorted(newest.values(), key=lambda r: r.info.start_time or 0)
    return included, excluded, settings


def _metric(run, name):
    value = run.data.metrics.get(name)
    return float(value) if value is not None else math.nan


# Tags that say what a run's numbers depend on beyond params and seed (runner.provenance);
# empty for runs logged before runs recorded them.
PROVENANCE = ("code_version", "git_commit", "torch_version", "cpu_kind", "precision", "threads")


def runs_frame(runs: list) -> pd.DataFrame:
    rows = []
    for r in runs:
        tags = r.data.tags
        wall = (r.info.end_time - r.info.start_time) / 1000.0 if r.info.end_time and r.info.start_time else math.nan
        history_run = r.info.run_id
        if "val_acc" not in r.data.metrics and tags.get("selected_run_id"):
            history_run = tags["selected_run_id"]  # a multi-stage parent: its selected student's curve
        rows.append({"run_id": r.info.run_id, "run_name": tags.get("mlflow.runName", ""),
                     "dataset": tags.get("dataset", r.data.params.get("dataset", "")),
                     "student": tags.get("student", r.data.params.get("student", "")),
                     "mode": tags["mode"], "teacher": tags.get("teacher", ""), "seed": _seed(r),
                     "test_acc": _metric(r, "test_acc"), "test_acc_last": _metric(r, "test_acc_last"),
                     "best_val_acc": _metric(r, "best_val_acc"),
                     "teacher_test_acc": _metric(r, "teacher_test_acc"), "wall_seconds": wall,
                     "parent_run_id": tags.get("mlflow.parentRunId", ""), "history_run_id": history_run,
                     **{k: tags.get(k, "") for k in PROVENANCE}})
    return pd.DataFrame(rows, columns=["run_id", "run_name", "dataset", "student", "mode", "teacher", "seed",
                                       "test_acc", "test_acc_last", "best_val_acc", "teacher_test_acc",
                                       "wall_seconds", "parent_run_id", "history_run_id", *PROVENANCE])


def _mode_order(mode: str) -> int:
    return DISTILLATION_MODES.index(mode) if mode in DISTILLATION_MODES else len(DISTILLATION_MODES)


def summarize(frame: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per (dataset, student, mode, teacher) of the included runs."""
    rows = []
    keys = ["dataset", "student", "mode", "teacher"]
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


def compare_experiment(experiment: str, client=None, *, skip_run_ids=(), histories: bool = True) -> Comparison:
    """Read ``experiment`` (a name, or an id) and compare its modes."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except Exception:
            exp = None
    if exp is None:
        raise ConfigError(f"experiment {experiment!r} does not exist at {shown_tracking_uri()}; "
                          f"pass the name of an experiment with runs (see the MLflow UI)")
    runs = counted_runs(search_all_runs(client, exp.experiment_id), skip_run_ids)
    included, excluded, settings = select_runs(runs)
    frame = runs_frame(included)
    excluded_frame = pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS)
    return Comparison(exp.name, exp.experiment_id, summarize(frame), frame, excluded_frame, settings,
                      val_acc_histories(client, frame) if histories else pd.DataFrame())


# ------------------------------------------------------------------- rendering
def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs tabulate, not a dependency)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _fmt(v, spec: str = ".2f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as people read it: mean ± std, the gain with its interval."""
    rows = []
    for r in summary.itertuples():
        # the test that matches the design: paired on matched seeds where there are >= 2
        paired = r.gain_test == "paired"
        estimate, low, high, p_holm = ((r.paired_gain, r.paired_ci_low, r.paired_ci_high, r.paired_p_holm) if paired
                                       else (r.gain_vs_nokd, r.gain_ci_low, r.gain_ci_high, r.gain_p_holm))
        gain = _fmt(estimate, "+.2f")
        if gain and not math.isnan(low):
            gain += f" [{low:+.2f}, {high:+.2f}]"
        rows.append({"dataset": r.dataset, "student": r.student, "mode": r.mode, "teacher": r.teacher,
                     "seeds": r.runs,
                     "test_acc (%)": _fmt(r.test_acc_mean) + (f" ± {r.test_acc_std:.2f}" if not math.isnan(r.test_acc_std) else ""),
                     "test_acc_last (%)": _fmt(r.test_acc_last_mean) + (
                         f" ± {r.test_acc_last_std:.2f}" if not math.isnan(r.test_acc_last_std) else ""),
                     "best val_acc (%)": _fmt(r.best_val_acc_max),
                     "wall time (s)": _fmt(r.wall_seconds_mean, ".1f"),
                     f"gain vs nokd [{int(CONFIDENCE * 100)}% CI]": gain,
                     "test": f"paired ({r.paired_seeds})" if paired else r.gain_test,
                     "p (Holm)": _fmt(p_holm, ".3g"),
                     "Welch p (Holm)": _fmt(r.gain_p_holm, ".3g")})
    return pd.DataFrame(rows)


def comparison_markdown(c: Comparison) -> str:
    lines = [f"## Comparison of experiment `{c.experiment}`", ""]
    if c.settings:
        lines.append("Common settings (majority): " + ", ".join(f"{k}={v}" for k, v in c.settings.items()))
        lines.append("")
    if len(c.summary):
        lines += [markdown_table(display_table(c.summary)), "",
                  f"test_acc: mean ± sample standard deviation over seeds; best val_acc: the best over seeds; "
                  f"gain: test_acc minus nokd's (same dataset and student) with its {int(CONFIDENCE * 100)}% "
                  f"t interval. Seed k trains every mode on the same split in the same batch order, so where "
                  f"a mode and nokd share >= 2 seeds the test is paired on those seeds (the gain is then the "
                  f"mean of the per-seed differences); otherwise Welch's, with >= 2 seeds each. "
                  f"test_acc is the best-validation student, test_acc_last the last epoch's (both the exported "
                  f"fp32 model). p (Holm): that test of gain = 0, Holm-adjusted over all modes compared "
                  f"with the same nokd; Welch p (Holm): Welch's test for every mode, for reference (summary.csv "
                  f"has both tests' intervals). An interval is per mode and not adjusted, so with many modes "
                  f"trust p (Holm) < 0.05 rather than an interval that just excludes 0."]
    else:
        lines.append("No comparable runs.")
    lines.append("")
    notes = provenance_notes(c.runs)
    if notes:
        lines += ["### Provenance", "", *[f"- note: {note}" for note in notes], ""]
    if len(c.excluded):
        lines += [f"### Left out ({len(c.excluded)} runs)", "",
                  markdown_table(c.excluded.assign(seed=c.excluded["seed"].map(
                      lambda s: "" if s is None or (isinstance(s, float) and math.isnan(s)) else str(int(s)))))]
    else:
        lines.append("No runs were left out.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- logging
def comparison_figures(c: Comparison) -> dict:
    """{artifact path: figure} for the comparison run."""
    from .plots import mode_comparison_points, val_acc_curves

    figures = {}
    if len(c.summary):
        nokd = c.summary.loc[c.summary["mode"] == BASELINE, "test_acc_mean"]
        teachers = (c.runs.dropna(subset=["teacher_test_acc"]).groupby("teacher")["teacher_test_acc"].mean()
                    .to_dict())
        figures["figures/test_acc_by_mode.png"] = mode_comparison_points(
            c.summary, teacher_acc=teachers, nokd_acc=float(nokd.iloc[0]) if len(nokd) else None,
            title=f"test accuracy by mode ({c.experiment})")
    if len(c.histories):
        figures["figures/val_acc_curves.png"] = val_acc_curves(c.histories, title=f"validation accuracy ({c.experiment})")
    return figures


def write_comparison(c: Comparison, out: Path, figures: bool = False) -> list[Path]:
    """The tables (CSV + Markdown) and settings into ``out`` (and, with ``figures``, the
    figures as PNG under ``out/figures``) -> the files written."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    c.summary.to_csv(out / "summary.csv", index=False)
    c.runs.to_csv(out / "runs.csv", index=False)
    c.excluded.to_csv(out / "excluded.csv", index=False)
    (out / "summary.md").write_text(c.markdown)
    (out / "settings.json").write_text(json.dumps({"experiment": c.experiment, "experiment_id": c.experiment_id,
                                                   "common_settings": c.settings}, indent=2))
    written = sorted(out.iterdir())
    if figures:
        import matplotlib.pyplot as plt

        for path, fig in comparison_figures(c).items():
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(target, dpi=150, bbox_inches="tight")
            plt.close(fig)
            written.append(target)
    return written


def log_comparison(c: Comparison, tracker) -> None:
    """Tables (CSV + Markdown), the excluded runs and figures as artifacts of ``tracker``'s run."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in write_comparison(c, Path(tmp) / "compare"):
            tracker.log_artifact(f, "compare")
    for path, fig in comparison_figures(c).items():
        tracker.log_figure(fig, path)
    tracker.log_metrics({"runs_compared": len(c.runs), "runs_left_out": len(c.excluded),
                         "modes_compared": int(c.summary["mode"].nunique()) if len(c.summary) else 0})
    tracker.set_tags({"compared_experiment": c.experiment, "compared_experiment_id": c.experiment_id})


def provenance_notes(runs: pd.DataFrame) -> list[str]:
    """One line per provenance tag whose compared runs disagree (a table that mixes code
    versions, CPU kinds, precisions or thread counts), and one for runs that record none."""
    notes = []
    if not len(runs):
        return notes
    for name in (n for n in PROVENANCE if n in runs):
        values = sorted({v for v in runs[name] if v})
        if len(values) > 1:
            counts = runs[name].value_counts()
            notes.append(f"the runs differ in {name}: " + ", ".join(f"{v} ({counts[v]} runs)" for v in values))
    unrecorded = int((runs["code_version"] == "").sum()) if "code_version" in runs else len(runs)
    if unrecorded:
        notes.append(f"{unrecorded} run(s) record no code_version (logged before runs recorded it)")
    return notes


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
    import mlflow

    from .tracking import check_tracking_server, start_run

    check_tracking_server()  # unreachable or refused: one line at once, not MLflow's minutes of retries
    adopted = os.environ.get("MLFLOW_RUN_ID")
    if not experiment:
        if adopted:
            experiment = mlflow.MlflowClient().get_run(adopted).info.experiment_id
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
    if not experiment:
        raise ConfigError("no experiment to compare; pass --experiment NAME (or -P experiment=NAME)")
    client = mlflow.MlflowClient()
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
