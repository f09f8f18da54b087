"""``kd-mlflow tune MODE``: a hyperparameter search on Ray Tune, with Optuna's TPE sampler
and ASHA early stopping on per-epoch validation accuracy.

Every trial is a cell of the execution layer (a nested MLflow run under the tune run,
trained by ``runner.run`` like any other), which reports val_acc to Tune after each epoch.
ASHA stops trials whose val_acc falls below the rung's median; their runs are marked
KILLED with the tag ``kd_mlflow.pruned_at_epoch``. Only validation accuracy ever decides:
the parent run logs the best completed trial's parameters, its best_val_acc and, for that
trial alone, its test_acc.

The first trial is the mode's defaults (where they lie in the space), so the search says
whether it beat them. The searcher is seeded (``--search-seed``); one trial at a time
(``--jobs 1``) makes the whole search repeatable on CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..modes import MODES
from .cells import RETRIES, Cell, Job, Options, check_options

KINDS = ("uniform", "loguniform", "int", "choice")
METRICS = {"val_acc": "max", "val_loss": "min"}
SEARCHES = ("tpe", "grid")
PRUNED_TAG = "kd_mlflow.pruned_at_epoch"


@dataclass
class Dimension:
    name: str
    kind: str  # one of KINDS
    values: tuple  # (low, high) or the choices

    def spec(self) -> str:
        return f"{self.name}={self.kind}:{(',' if self.kind == 'choice' else ':').join(map(str, self.values))}"

    def contains(self, value) -> bool:
        if self.kind == "choice":
            return value in self.values
        return self.values[0] <= value <= self.values[1]

    def log_scale(self) -> bool:
        return self.kind == "loguniform"


def parse_space(mode: str, specs: list[str]) -> list[Dimension]:
    """``name=kind:args`` per searched parameter -> Dimensions; one line naming the problem."""
    if not specs:
        raise ConfigError(f"give at least one --space, e.g. --space lr=loguniform:0.01:0.5; {mode}'s parameters: "
                          f"{', '.join(MODES[mode].fields)}")
    out = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        kind, _, args = rest.partition(":")
        name, kind = name.strip(), kind.strip()
        if not sep or kind not in KINDS or not args:
            raise ConfigError(f"--space {spec!r} is not NAME=KIND:ARGS with KIND one of {', '.join(KINDS)} "
                              f"(e.g. temperature=loguniform:1:16, alpha=uniform:0.5:1, dkd_beta=choice:2,4,8)")
        if name not in MODES[mode].fields:
            raise ConfigError(MODES[mode].unknown_parameter(name))
        if name in ("epochs", "seed", "resume"):
            raise ConfigError(f"--space cannot search {name}: it is the trials' budget or identity; set it with "
                              f"--{name}")
        if name in (d.name for d in out):
            raise ConfigError(f"--space names {name} twice")
        ptype = Config.parameter(name, mode).type
        if kind != "choice" and ptype not in ("int", "float"):
            raise ConfigError(f"{name} is a {ptype}: search it with choice:A,B,...")
        cast = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true"), "str": str}.get(ptype, str)
        try:
            values = tuple(cast(v.strip()) for v in args.split("," if kind == "choice" else ":"))
        except ValueError:
            raise ConfigError(f"--space {spec!r}: {args!r} are not {ptype} values") from None
        if kind != "choice":
            if len(values) != 2 or not values[0] < values[1]:
                raise ConfigError(f"--space {spec!r}: give LOW:HIGH with LOW < HIGH")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"--space {spec!r}: loguniform needs LOW > 0")
            if kind == "int" and ptype != "int":
                raise ConfigError(f"--space {spec!r}: {name} is a {ptype}; use uniform or loguniform")
            if kind != "int" and ptype == "int":
                raise ConfigError(f"--space {spec!r}: {name} is whole; use int:LOW:HIGH or choice")
        out.append(Dimension(name, kind, values))
    return out


def _tune_space(dims: list[Dimension]) -> dict:
    from ray import tune

    make = {"uniform": lambda lo, hi: tune.uniform(lo, hi), "loguniform": lambda lo, hi: tune.loguniform(lo, hi),
            "int": lambda lo, hi: tune.randint(lo, hi + 1)}  # randint's upper bound is exclusive
    return {d.name: tune.choice(list(d.values)) if d.kind == "choice" else make[d.kind](*d.values) for d in dims}


def check_space(base: Config, dims: list[Dimension]) -> None:
    """Every corner of the space is a valid configuration (one line before any run)."""
    corners = [{}]
    for d in dims:
        corners = [{**c, d.name: v} for c in corners for v in d.values]
    for corner in corners[:64]:
        try:
            base.replace(**corner).validate()
        except ConfigError as exc:
            raise ConfigError(f"--space {', '.join(f'{k}={v}' for k, v in corner.items())}: {exc}") from None


# ------------------------------------------------------------------ a trial, in a Ray worker
class _Reporting:
    """The trial's tracker: everything goes to MLflow, and each epoch's validation
    numbers also go to Tune (which may stop the trial there)."""

    def __init__(self, inner):
        self._inner = inner
        self.run_id = inner.run_id

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._inner.log_metrics(metrics, step)
        if "val_acc" in metrics and step is not None:
            from ray import tune

            # Tune may stop the trial at this report, and a stopped trial's process ends
            # without closing its run: the epoch's metrics reach MLflow first.
            self._inner.flush_metrics()

            tune.report({"val_acc": metrics["val_acc"], "val_loss": metrics.get("val_loss", math.nan),
                         "epoch": step + 1, "run_id": self.run_id})


def _number(trial_name: str) -> int:
    """The trial's number from its name (``trial<N>``, see _search's trial_name_creator)."""
    return int(trial_name.removeprefix("trial"))


def _trial(config: dict, base: Config = None, job: Job = None, env: dict = None, driver_code: str = "") -> None:
    from ray import tune

    from .cells import enter_worker, run_cell_here

    refused = enter_worker(job, env, driver_code)
    if refused:
        raise RuntimeError(refused)
    number = _number(tune.get_context().get_trial_name())
    cfg = base.replace(**config)
    cell = Cell(number, cfg, f"{cfg.mode}-trial{number}", {"tune_run_id": job.parent_run_id, "trial": str(number),
                                                           "seed": str(cfg.seed)})
    outcome = run_cell_here(cell, job, wrap=_Reporting)
    if outcome.error:
        raise RuntimeError(outcome.error)


# ------------------------------------------------------------------ the search
@dataclass
class TuneResult:
    run_id: str
    trials: list  # dicts: trial, run_id, params, status (completed/pruned/failed), epoch, best_val_acc
    best: dict | None = None


def run_tune(mode: str, space: list[str], trials: int = 8, metric: str = "val_acc", grace_epochs: int = 1,
             search_seed: int = 0, seed: int = 0, *, search: str = "tpe", opts: Options | None = None, echo=print,
             **common) -> TuneResult:
    from ..benchmark import BENCHMARK_FIELDS, check_fields, check_single_training, precheck
    from ..tracking import redact, start_run

    check_single_training(mode, "tune searches")
    check_fields("tune", common)
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: one of {', '.join(METRICS)} (selection never sees test data)")
    if int(trials) < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    opts = opts or Options()
    check_options(opts)
    dims = parse_space(mode, list(space))
    if search not in SEARCHES:
        raise ConfigError(f"--search {search!r}: one of {', '.join(SEARCHES)}")
    if search == "grid":
        ranges = [d.spec() for d in dims if d.kind != "choice"]
        if ranges:
            raise ConfigError(f"--search grid trains every combination of choice values; {', '.join(ranges)} is a "
                              f"range: give choice:A,B,...")
        trials = math.prod(len(d.values) for d in dims)
    base = Config.for_mode(mode, **Config.taken_by(mode, common), seed=seed)
    base.validate()
    if search != "grid" and not 1 <= grace_epochs < base.epochs:
        raise ConfigError(f"--grace-epochs must be >= 1 and below epochs ({base.epochs}): a trial is judged after "
                          f"that many epochs and may be stopped; got {grace_epochs}")
    check_space(base, dims)
    precheck([base])
    # optimizer=auto and lr=0 mean the network's recipe: the first trial is what they resolve to
    resolved = {"optimizer": base.optimizer_used, "lr": base.lr_used}
    defaults = {d.name: resolved.get(d.name, getattr(base, d.name)) for d in dims}
    first = [defaults] if all(d.contains(defaults[d.name]) for d in dims) else []

    params = {"tune_mode": mode, "space": " ".join(d.spec() for d in dims), "search": search, "trials": int(trials),
              "metric": metric,
              "grace_epochs": int(grace_epochs), "search_seed": int(search_seed), "seed": int(seed),
              "jobs": opts.jobs, **opts.params(),
              **{k: getattr(base, k) for k in BENCHMARK_FIELDS if k in MODES[mode].fields}}
    tags = {"mode": "tune", "dataset": base.dataset, "student": base.student, "tune_mode": mode}
    with start_run(params, tags, run_name=f"tune-{mode}") as parent:
        job = Job(parent.run_id, "tune", storage=opts.storage, workdir=os.getcwd())
        rows = _search(base, dims, first, int(trials), metric, int(grace_epochs), int(search_seed), job, opts, echo,
                       grid=search == "grid")
        result = TuneResult(parent.run_id, rows)
        completed = [r for r in rows if r["status"] == "completed" and r["best_val_acc"] is not None]
        if completed:
            best = max(completed, key=lambda r: (r["best_val_acc"], -r["trial"]))
            result.best = best
            parent.log_params({f"best_{k}": v for k, v in best["params"].items()})
            parent.log_metrics({"best_val_acc": best["best_val_acc"], "best_trial_test_acc": best["test_acc"],
                                "trials_completed": len(completed),
                                "trials_pruned": sum(r["status"] == "pruned" for r in rows),
                                "trials_failed": sum(r["status"] == "failed" for r in rows)})
            parent.set_tags({"best_trial_run_id": best["run_id"], "best_trial": str(best["trial"])})
        parent.log_dict(rows, "tune_trials.json")
        if rows:
            from ..analysis.plots import tune_history, tune_parameters

            title = f"tune {mode}: {base.student} on {base.dataset}, {len(rows)} trials"
            parent.log_figure(tune_history(rows, title), "figures/tune_history.png")
            parent.log_figure(tune_parameters(rows, dims, title), "figures/tune_parameters.png")
    for r in rows:
        shown = ", ".join(f"{k}={_short(v)}" for k, v in r["params"].items())
        val = f"best_val_acc {r['best_val_acc']:.2f}%" if r["best_val_acc"] is not None else "no epoch"
        echo(f"trial {r['trial']}: {shown}: {r['status']}"
             f"{' at epoch ' + str(r['epoch']) if r['status'] == 'pruned' else ''}, {val}"
             f"{' (' + redact(r['error']) + ')' if r.get('error') else ''}")
    if result.best:
        b = result.best
        echo(f"best trial {b['trial']} (run {b['run_id']}): "
             f"{', '.join(f'{k}={_short(v)}' for k, v in b['params'].items())}; best_val_acc "
             f"{b['best_val_acc']:.2f}%, its test_acc {b['test_acc']:.2f}% (chosen on validation only)")
    echo(f"tune run {result.run_id}")
    return result


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _search(base, dims, first, trials, metric, grace, search_seed, job, opts, echo, grid=False) -> list[dict]:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from ..runner import _terminate_on_sigterm
    from ..tracking import code_version, kill_unfinished_children, mark_pruned, run_summary, worker_environment
    from .ray_backend import _as_signalled, _connect, _resources

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started_here = _connect(opts, echo)
    try:
        res = _resources(Cell(0, base, "probe"), opts)
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, job=job, env=worker_environment(), driver_code=code_version()),
            {"cpu": res["num_cpus"], "gpu": res["num_gpus"]})
        if grid:  # every combination, each trained to the end (kdparam's grid, spread on Ray)
            searcher, scheduler = None, None
            space = {d.name: tune.grid_search(list(d.values)) for d in dims}
        else:
            searcher = OptunaSearch(metric=metric, mode=METRICS[metric], seed=search_seed,
                                    points_to_evaluate=first or None)
            # Rungs below the last epoch only: a trial that reaches the last epoch is never
            # stopped before its test evaluation and model are logged.
            scheduler = ASHAScheduler(time_attr="epoch", metric=metric, mode=METRICS[metric], max_t=base.epochs - 1,
                                      grace_period=grace, reduction_factor=2, stop_last_trials=False)
            space = _tune_space(dims)
        storage = os.path.abspath(os.path.join(job.storage or "runs", "ray_tune"))
        created: list = []

        def name(trial) -> str:
            """trial1, trial2, ... in the order the searcher proposes them (names and folders)."""
            if trial.trial_id not in created:
                created.append(trial.trial_id)
            return f"trial{created.index(trial.trial_id) + 1}"

        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints no tables
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(metric=metric if grid else None,
                                                       mode=METRICS[metric] if grid else None,
                                                       search_alg=searcher, scheduler=scheduler,
                                                       num_samples=1 if grid else trials,
                                                       max_concurrent_trials=opts.jobs if opts.jobs > 0 else None,
                                                       trial_name_creator=name, trial_dirname_creator=name),
                           run_config=tune.RunConfig(name=f"tune-{job.parent_run_id}", storage_path=storage,
                                                     failure_config=tune.FailureConfig(max_failures=RETRIES),
                                                     verbose=0))
        how = "a grid, every trial to the end" if grid else \
            f"ASHA on {metric} from epoch {grace}, Optuna TPE (seed {search_seed})"
        echo(f"tune {base.mode}: {trials} trials, {res['num_cpus']:g} CPU"
             f"{', %g GPU' % res['num_gpus'] if res['num_gpus'] else ''} each, {how}")
        try:
            with _terminate_on_sigterm() as received, _as_signalled(received):
                grid = tuner.fit()
        except BaseException:
            kill_unfinished_children(job.parent_run_id)
            raise
        rows = []
        for result in grid:
            metrics = result.metrics or {}
            config = {d.name: result.config[d.name] for d in dims}
            run_id = metrics.get("run_id", "")
            summary = run_summary(run_id) if run_id else {}
            epoch = int(metrics.get("epoch", 0))
            status = "failed" if result.error else "completed" if summary.get("status") == "FINISHED" else "pruned"
            if status == "pruned":
                mark_pruned(run_id, epoch)
            trial = _number(os.path.basename(result.path.rstrip("/")))
            rows.append({"trial": trial, "trial_id": metrics.get("trial_id", ""), "run_id": run_id, "params": config,
                         "status": status, "epoch": epoch,
                         "best_val_acc": summary.get("best_val_acc", _best_reported(result, metric)),
                         "test_acc": summary.get("test_acc") if status == "completed" else None,
                         "error": str(result.error).strip().splitlines()[-1][:300] if result.error else ""})
        rows.sort(key=lambda r: r["trial"])
        return rows
    finally:
        if started_here:
            ray.shutdown()


def _best_reported(result, metric: str):
    frame = result.metrics_dataframe
    if frame is None or "val_acc" not in frame:
        return None
    return float(frame["val_acc"].max())
