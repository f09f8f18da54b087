"""Which runs of an experiment a comparison counts, read through kd_mlflow.tracking.

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
from collections import Counter

import pandas as pd

from ..config import Config
from ..modes import DISTILLATION_MODES, EXECUTION, MODES, OPTIM

# Settings every mode has and that must agree for numbers to be comparable across
# modes (seed varies by design; mode-specific parameters are checked per mode).
COMMON_SETTINGS = ("dataset", "student", "train_subset", "val_size", "test_subset", *OPTIM)
# Where and how a run ran, not what it computed; never a reason to exclude a run.
NOT_SETTINGS = {*EXECUTION, "mode", "seed", "teacher", "teacher_checkpoint", "compared_experiment"}
BOOKKEEPING_MODES = {"compare", "benchmark", "sweep"}
EXCLUDED_COLUMNS = ["run_id", "run_name", "mode", "teacher", "seed", "status", "reason"]


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


# Where and how a run ran, not what it computed: a resume never tells runs apart by these.
RESUME_IGNORES = set(EXECUTION)


def settings_match(run, cfg: Config) -> bool:
    """Whether ``run`` trained what ``cfg`` describes: every param of the mode equal
    (numbers compared as numbers), except those in RESUME_IGNORES. A param the run does
    not have counts as the parameter's default (it was logged before the parameter was
    added to the mode; see compare.logged_value)."""
    return all(logged_value(run, k, cfg.mode) == normalize_value(v)
               for k, v in cfg.params().items() if k not in RESUME_IGNORES)


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
                     "train_seconds": math.nan,  # compare_experiment reads it from the epochs' history
                     "parent_run_id": tags.get("mlflow.parentRunId", ""), "history_run_id": history_run,
                     **{k: tags.get(k, "") for k in PROVENANCE}})
    return pd.DataFrame(rows, columns=["run_id", "run_name", "dataset", "student", "mode", "teacher", "seed",
                                       "test_acc", "test_acc_last", "best_val_acc", "teacher_test_acc",
                                       "wall_seconds", "train_seconds", "parent_run_id", "history_run_id",
                                       *PROVENANCE])
