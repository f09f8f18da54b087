"""A weight sweep: one mode, one of its numeric parameters over a list of values, N
seeds, as nested runs of one parent (tag ``mode=sweep``), then a table per value.

It is how the modes' default weights were chosen (docs/benchmark/): the value with the
best mean validation accuracy is marked ``selected``; test accuracy is reported beside
it and never used to choose. Resumes like a benchmark: a (value, seed) pair that already
has a FINISHED run with the same settings in the experiment is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import Config, ConfigError
from .modes import MODES


@dataclass
class SweepResult:
    run_id: str
    experiment: str
    table: object = None  # pandas DataFrame, one row per value
    trained: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)


def plan_sweep(mode: str, param: str, values: str, seeds: int, common: dict, first_seed: int = 0) -> list[Config]:
    """Validated Configs, value-major then seed; a ConfigError naming the problem first."""
    from .benchmark import check_single_training

    check_single_training(mode, "sweep trains")
    if param not in MODES[mode].fields:
        raise ConfigError(MODES[mode].unknown_parameter(param))
    kind = Config.parameter(param, mode).type
    if kind not in ("int", "float"):
        raise ConfigError(f"sweep varies a numeric parameter; {param} is a {kind}")
    cast = int if kind == "int" else float
    try:
        grid = [cast(v.strip()) for v in str(values).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"values={values!r} is not a comma-separated list of numbers; e.g. --values 1,10,100") from None
    if not grid:
        raise ConfigError("values is empty; e.g. --values 1,10,100")
    if int(seeds) < 1:
        raise ConfigError(f"seeds must be >= 1 (the number of seeds: 0..N-1), got {seeds}")
    configs = []
    for value in grid:
        for seed in range(int(first_seed), int(first_seed) + int(seeds)):
            cfg = Config.for_mode(mode, **{**Config.taken_by(mode, common), "seed": seed, param: value})
            try:
                cfg.validate()
            except ConfigError as exc:
                raise ConfigError(f"{param}={value}: {exc}") from None
            configs.append(cfg)
    return configs


def sweep_table(rows: list[dict], param: str):
    """rows (value, seed, test_acc, test_acc_last, best_val_acc) -> one row per value with
    means, sample standard deviations and the selected (best mean val_acc) value."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    out = []
    for value, group in frame.groupby("value", sort=True):
        row = {param: value, "seeds": len(group)}
        for name in ("best_val_acc", "test_acc", "test_acc_last"):
            row[f"{name}_mean"] = group[name].mean()
            row[f"{name}_std"] = group[name].std(ddof=1) if len(group) > 1 else math.nan
        out.append(row)
    table = pd.DataFrame(out)
    best = table["best_val_acc_mean"].idxmax()
    table["selected"] = [i == best for i in table.index]
    return table


def run_sweep(mode: str, param: str, values: str, seeds: int = 2, *, output: str = "", echo=print, opts=None,
              first_seed: int = 0, **common) -> SweepResult:
    """Train ``mode`` for every value of ``param`` x ``seeds`` as nested runs (through the
    execution layer, ``opts``: in this process or on Ray); -> the table."""
    from .benchmark import BENCHMARK_FIELDS, BenchmarkResult, check_fields, precheck, train_pairs
    from .analysis.runs import counted_runs
    from .analysis.report import markdown_table
    from .execution import Options, check_options
    from .tracking import start_run
    from .tracking.queries import client as tracking_client
    from .tracking.queries import experiment_of_run, search_all_runs

    check_fields("sweep", common)
    opts = opts or Options()
    check_options(opts)
    configs = plan_sweep(mode, param, values, seeds, common, first_seed)
    precheck(configs[:1])
    base = configs[0]
    params = {"sweep_mode": mode, "sweep_param": param, "sweep_values": values, "seeds": int(seeds),
              "first_seed": int(first_seed),
              "jobs": opts.jobs, **opts.params(),
              **{k: getattr(base, k) for k in BENCHMARK_FIELDS if k in MODES[mode].fields}}
    tags = {"mode": "sweep", "dataset": base.dataset, "student": base.student, "sweep_mode": mode,
            "sweep_param": param}
    client = tracking_client()
    with start_run(params, tags, run_name=f"sweep-{mode}-{param}") as parent:
        experiment_id, experiment = experiment_of_run(client, parent.run_id)
        result = SweepResult(parent.run_id, experiment)
        existing = counted_runs(search_all_runs(client, experiment_id), skip_run_ids={parent.run_id})
        pairs = BenchmarkResult(parent.run_id, result.experiment)
        train_pairs(configs, parent, pairs, existing=existing, echo=echo, opts=opts, kind="sweep",
                    name=lambda cfg: f"{mode}-{param}{getattr(cfg, param)}-seed{cfg.seed}",
                    tags=lambda cfg: {"sweep_run_id": parent.run_id, "seed": str(cfg.seed)})
        result.trained, result.skipped = len(pairs.trained), len(pairs.skipped)
        result.failed = [f"{param}={getattr(p.cfg, param)} seed {p.seed}: {p.error}" for p in pairs.failed]
        done = sorted(pairs.trained + pairs.skipped, key=lambda p: configs.index(p.cfg))
        rows = [{"value": getattr(p.cfg, param), "seed": p.seed,
                 **{k: p.metrics.get(k, math.nan) for k in ("test_acc", "test_acc_last", "best_val_acc")}}
                for p in done]
        if rows:
            result.table = sweep_table(rows, param)
            parent.log_dict(result.table.to_dict(orient="records"), "sweep.json")
            selected = result.table[result.table["selected"]].iloc[0]
            parent.log_metrics({"selected_value": float(selected[param]),
                                "selected_best_val_acc_mean": float(selected["best_val_acc_mean"])})
            if output:
                result.table.to_csv(output, index=False, float_format="%.4f")
    if result.table is not None:
        echo(markdown_table(result.table.round(2)))
        echo(f"sweep run {result.run_id} in experiment {result.experiment!r}: {result.trained} trained, "
             f"{result.skipped} skipped; selected by mean best_val_acc: {param}={selected[param]}")
    for line in result.failed:
        echo(f"failed: {line}")
    return result
