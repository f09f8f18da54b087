"""The paper's table with one command: modes x seeds as runs of one experiment, then
the comparison.

``run_benchmark`` opens a parent run (tag ``mode=benchmark``; under ``mlflow run`` the
run MLflow created) and trains every (mode, seed) pair as a nested child run through
``runner.run`` — the same validation, data, trainer and logging as a single
``kd-mlflow train`` — then logs a ``compare`` child with the table and figures.

Resuming: a (mode, seed) pair that already has a FINISHED run with the same settings
in the experiment (a top-level run or a child of an earlier benchmark; see
:func:`settings_match`) is skipped, so an interrupted benchmark picks up where it
stopped. Pairs run seed-major (every mode with seed 0, then seed 1, ...), so an
interrupted benchmark already has a complete table for the first seeds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from . import teacher_cache
from .config import Config, ConfigError
from .modes import DISTILLATION_MODES, EXECUTION, MODES

# Config fields a benchmark takes (everything else: each mode's own defaults).
# The strategies' inputs (teachers, the kdparam grid) and labeled_fraction apply to the modes
# that have them; a benchmark of the committed teachers needs no teacher training.
BENCHMARK_FIELDS = ("dataset", "student", "teacher", "teacher_checkpoint", "ensemble", "teachers", "temperatures",
                    "alphas", "labeled_fraction", "epochs", "batch_size", "lr", "train_subset", "val_size",
                    "test_subset", "device", "precision", "threads", "teacher_cache", "data_dir", "experiment")
# Params that say where or how a run ran, not what it computed: a finished run that
# differs only in these still counts as done.
RESUME_IGNORES = set(EXECUTION)


@dataclass
class Pair:
    mode: str
    seed: int
    run_id: str = ""
    test_acc: float | None = None
    error: str = ""


@dataclass
class BenchmarkResult:
    run_id: str
    experiment: str
    trained: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    comparison: object = None
    compare_run_id: str = ""


def parse_modes(text: str) -> list[str]:
    """"all" (every distillation mode of the registry) or a comma-separated list, in registry order."""
    items = [m.strip() for m in str(text).split(",") if m.strip()]
    if not items:
        raise ConfigError("modes is empty; pass -P modes=all or a list such as -P modes=nokd,kd,rkd")
    if items == ["all"]:
        return list(DISTILLATION_MODES)
    unknown = [m for m in items if m not in DISTILLATION_MODES]
    if unknown:
        raise ConfigError(f"unknown mode(s) {', '.join(unknown)} in modes; choose from: all, "
                          f"{', '.join(DISTILLATION_MODES)}")
    return [m for m in DISTILLATION_MODES if m in items]


def plan(modes: str, seeds: int, values: dict) -> tuple[list[Config], list[str]]:
    """-> (validated Configs, seed-major; notes about modes left out). Fails with a
    ConfigError naming the mode before anything runs."""
    if int(seeds) < 1:
        raise ConfigError(f"seeds must be >= 1 (the number of seeds: 0..N-1), got {seeds}")
    chosen = parse_modes(modes)
    notes = []
    for mode in list(chosen):
        if MODES[mode].needs:
            name, note = MODES[mode].needs
            if not Config(**{name: values.get(name, "")}).list_of(name):
                chosen.remove(mode)
                notes.append(f"{mode} skipped: {note}")
    configs = []
    for seed in range(int(seeds)):
        for mode in chosen:
            cfg = Config.for_mode(mode, **values, seed=seed)
            try:
                cfg.validate()
            except ConfigError as exc:
                raise ConfigError(f"mode {mode}: {exc}") from None
            configs.append(cfg)
    return configs, notes


def precheck(configs: list[Config]) -> str:
    """Everything runner.run would check per pair, once per mode, before any run
    exists: the implementation, the device, the teachers and strategy inputs.
    -> the teacher architecture (for the parent's tag)."""
    from .runner import load_teachers, runtime_for

    teacher_arch = ""
    seen = set()
    for cfg in configs:
        if cfg.mode in seen:
            continue
        seen.add(cfg.mode)
        mode = MODES[cfg.mode]
        impl = mode.load()
        runtime_for(cfg)
        if mode.teacher_source and (mode.teacher_source != "teacher" or not teacher_arch):
            _, metas = load_teachers(cfg, mode)
            if mode.teacher_source == "teacher":
                teacher_arch = metas[0]["arch"]
        if hasattr(impl, "prepare"):
            impl.prepare(cfg)
    return teacher_arch


def settings_match(run, cfg: Config) -> bool:
    """Whether ``run`` trained what ``cfg`` describes: every param of the mode equal
    (numbers compared as numbers), except those in RESUME_IGNORES. A param the run does
    not have counts as the parameter's default (it was logged before the parameter was
    added to the mode; see compare.logged_value)."""
    from .compare import logged_value, normalize_value

    return all(logged_value(run, k, cfg.mode) == normalize_value(v)
               for k, v in cfg.params().items() if k not in RESUME_IGNORES)


def finished_run_for(runs: list, cfg: Config):
    """The newest FINISHED run of ``cfg``'s cell made by this code version, or None. A run
    of other code (or from before runs recorded theirs) is not reused: a cell's numbers
    are a function of its parameters, its seed and the code, and one table must not mix
    code versions."""
    from .tracking import code_version

    version = code_version()
    for r in reversed(runs):  # the newest first
        if (r.info.status == "FINISHED" and r.data.tags.get("mode") == cfg.mode
                and r.data.tags.get("code_version") == version
                and "test_acc" in r.data.metrics and settings_match(r, cfg)):
            return r
    return None


class _Unregistered:
    """A tracker that logs models but registers none (benchmark students are
    measurements; ``register=1`` turns registration back on)."""

    def __init__(self, inner):
        self._inner = inner
        self.run_id = inner.run_id

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def log_model(self, model, example, *, registered_name=None, **kwargs):
        return self._inner.log_model(model, example, registered_name=None, **kwargs)

    def register(self, model_uri, name, card=None):
        return None

    @contextlib.contextmanager
    def child(self, name, tags=None):
        with self._inner.child(name, tags) as inner:
            yield _Unregistered(inner)


@contextlib.contextmanager
def child_run(parent, name: str, params: dict, tags: dict, *, register: bool = True):
    """A run nested under the benchmark's run (``parent``, a tracker), with the same
    guarantees as every run: params logged, never left RUNNING."""
    from .tracking import git_commit

    with parent.child(name, {**tags, "git_commit": git_commit()}) as tracker:
        tracker.log_params(params)
        yield tracker if register else _Unregistered(tracker)


def _pair_factory(parent, name: str, extra_tags: dict, register: bool):
    """A ``tracker_factory`` for runner.run: the pair's run nested under the benchmark."""

    def factory(params, tags, run_name=None, **_):
        return child_run(parent, name, params, {**tags, **extra_tags}, register=register)

    return factory


def run_cell(cfg: Config, factory):
    """runner.run of one cell of a benchmark or sweep -> (result, "") or (None, a one-line
    error): a failed cell is reported, and the others still run (Ctrl-C still stops all)."""
    from .runner import run
    from .tracking import redact

    try:
        return run(cfg, tracker_factory=factory), ""
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        text = redact(str(exc)).strip()
        return None, f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def train_pairs(configs: list[Config], parent, result: BenchmarkResult, *, existing=(), register: bool = False,
                echo=print, on_registered=None, jobs: int = 1):
    """Train each pair of ``configs`` as a run nested under ``parent`` (a tracker), except
    those already finished in ``existing`` runs, into ``result``'s trained, skipped and
    failed lists -> the teacher cache's Counts (None when teacher_cache is off).

    The pairs share a teacher cache (teacher_cache.py): the modes of one seed that run
    the same teacher on the same batches (kd, triplet, dkd, dist, multikd's members,
    takd's first link) run it once. Pairs run seed-major and another seed never sees
    the same batches, so the cache is emptied when the seed changes.

    ``jobs`` > 1: the pairs to train run in that many worker processes at once (see
    :func:`_train_in_workers`); each worker has its own cache."""
    total = len(configs)
    pending = []
    for i, cfg in enumerate(configs, start=1):
        done = finished_run_for(existing, cfg)
        if done is None:
            pending.append((i, cfg))
            continue
        result.skipped.append(Pair(cfg.mode, cfg.seed, done.info.run_id, done.data.metrics.get("test_acc")))
        echo(f"[{i}/{total}] {cfg.mode} seed {cfg.seed}: skipped, finished as run {done.info.run_id} "
             f"(test_acc {done.data.metrics['test_acc']:.2f}%)")

    def finished(i: int, cfg: Config, run_id: str, test_acc, registered_model, message: str) -> None:
        label = f"[{i}/{total}] {cfg.mode} seed {cfg.seed}"
        if message:  # one broken mode must not cost the others; listed at the end
            result.failed.append(Pair(cfg.mode, cfg.seed, error=message))
            echo(f"{label}: FAILED ({message})")
            return
        if register and registered_model and on_registered is not None:
            on_registered(registered_model)
        result.trained.append(Pair(cfg.mode, cfg.seed, run_id, test_acc))
        echo(f"{label}: test_acc {test_acc:.2f}% (run {run_id})")

    cache = any(c.teacher_cache for c in configs)
    if jobs > 1 and len(pending) > 1:
        return _train_in_workers(pending, total, parent.run_id, register, min(jobs, len(pending)), cache,
                                 finished, echo)
    with teacher_cache.session(cache) as counts:
        seed = None
        for i, cfg in pending:
            if counts is not None and cfg.seed != seed:
                counts.cache.clear()
            seed = cfg.seed
            echo(f"[{i}/{total}] {cfg.mode} seed {cfg.seed}: training")
            res, message = run_cell(cfg, _cell_factory(parent, cfg, register))
            finished(i, cfg, res.run_id or "" if res else "", res.test_acc if res else None,
                     res.registered_model if res else None, message)
    return counts


def _cell_factory(parent, cfg: Config, register: bool):
    return _pair_factory(parent, f"{cfg.mode}-seed{cfg.seed}",
                         {"benchmark_run_id": parent.run_id, "seed": str(cfg.seed)}, register)


# ------------------------------------------------------------------ --jobs N
def _worker(tasks, results, parent_run_id: str, register: bool, cache: bool) -> None:
    """One of ``--jobs`` processes: trains the cells it takes from ``tasks`` as runs
    nested under the benchmark's run, until it takes None. Each cell is an ordinary
    runner.run (its run ends FINISHED, FAILED, or KILLED on SIGTERM/Ctrl-C)."""
    import os

    from .tracking.tracker import MlflowTracker

    # Under `mlflow run` the launcher's run id is in the environment; a cell must open its
    # own nested run, never adopt the benchmark's.
    os.environ.pop("MLFLOW_RUN_ID", None)
    parent = MlflowTracker(parent_run_id)
    try:
        with teacher_cache.session(cache) as counts:
            seed = None
            while (task := tasks.get()) is not None:
                i, cfg = task
                if counts is not None and cfg.seed != seed:
                    counts.cache.clear()
                seed = cfg.seed
                results.put(("start", i, os.getpid()))
                res, message = run_cell(cfg, _cell_factory(parent, cfg, register))
                results.put(("done", i, (res.run_id or "") if res else "", res.test_acc if res else None,
                             res.registered_model if res else None, message))
            results.put(("counts", counts.metrics() if counts is not None else {}))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal; the cell's run is KILLED
        pass


def _train_in_workers(pending, total: int, parent_run_id: str, register: bool, jobs: int, cache: bool,
                      finished, echo):
    """Train ``pending`` [(index, Config)] in ``jobs`` spawned worker processes that share
    the device (one GPU: small students leave most of it idle). Each cell runs with its
    own ``threads`` parameter, never a share worked out from ``jobs``: a CPU cell's numbers
    depend on its thread count, and must not depend on how many cells ran beside it (give
    cells one thread each with ``--threads 1`` when they should not share cores). Cells are
    handed out in order (seed-major), as workers free up. A worker that dies (out of memory, a segfault) fails the cell it
    was training, with one line; the other workers take the queued cells. Ctrl-C or
    SIGTERM sends SIGTERM to the workers, so their cells' runs end KILLED, and then stops."""
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")  # CUDA and torch's thread pools do not survive fork
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in pending:
        tasks.put(item)
    for _ in range(jobs):
        tasks.put(None)
    echo(f"{len(pending)} cells in {jobs} worker processes")
    workers = [ctx.Process(target=_worker, args=(tasks, results, parent_run_id, register, cache),
                           name=f"benchmark-worker-{k}", daemon=True) for k in range(jobs)]
    for w in workers:
        w.start()
    by_index = dict(pending)
    running: dict[int, int] = {}  # cell index -> the pid of the worker training it
    remaining = set(by_index)
    alive = list(workers)
    counts = teacher_cache.Counts()  # the workers' counters, added up

    def handle(message) -> None:
        if message[0] == "start":
            _, i, pid = message
            running[i] = pid
            echo(f"[{i}/{total}] {by_index[i].mode} seed {by_index[i].seed}: training (worker {pid})")
        elif message[0] == "done":
            _, i, run_id, test_acc, registered_model, error = message
            running.pop(i, None)
            remaining.discard(i)
            finished(i, by_index[i], run_id, test_acc, registered_model, error)
        else:  # "counts": a worker's last message
            counts.computed += message[1].get("teacher_forwards_computed", 0)
            counts.reused += message[1].get("teacher_forwards_reused", 0)

    from .runner import _terminate_on_sigterm

    try:
        with _terminate_on_sigterm():  # SIGTERM raises here too, so the workers are stopped below
            while True:  # until every worker has exited (each does after its None) and its messages are read
                try:
                    handle(results.get(timeout=2))
                    continue
                except queue_module.Empty:
                    pass
                for w in [w for w in alive if not w.is_alive()]:
                    alive.remove(w)
                    if w.exitcode != 0:  # killed: the cell it was training never reports
                        for i in [i for i, pid in running.items() if pid == w.pid]:
                            running.pop(i)
                            remaining.discard(i)
                            finished(i, by_index[i], "", None, None,
                                     f"its worker process {w.pid} died (exit code {w.exitcode}; out of memory?); "
                                     f"run the command again to retry it")
                if not alive:
                    while True:
                        try:
                            handle(results.get(timeout=0.5))
                        except queue_module.Empty:
                            break
                    break
    except BaseException:
        for w in workers:
            if w.is_alive():
                w.terminate()  # SIGTERM: the cell's run ends KILLED
        for w in workers:
            w.join(timeout=60)
        raise
    for i in sorted(remaining):  # never started, or lost between queue and start
        finished(i, by_index[i], "", None, None, "not trained: every worker process died; run the command again")
    for w in workers:
        w.join(timeout=60)
    return counts if cache else None


def run_benchmark(modes: str = "all", seeds: int = 3, register: bool = False, echo=print, jobs: int = 1,
                  **values) -> BenchmarkResult:
    """Train ``modes`` x ``seeds`` (skipping pairs already finished with the same
    settings), ``jobs`` at a time, then compare. ``values``: the Config fields in
    BENCHMARK_FIELDS."""
    import mlflow

    from .compare import compare_experiment, counted_runs, log_comparison, search_all_runs
    from .registry import update_champion
    from .tracking import start_run

    unknown = set(values) - set(BENCHMARK_FIELDS)
    if unknown:
        raise ConfigError(f"benchmark does not take {', '.join(sorted(unknown))}; it takes: {', '.join(BENCHMARK_FIELDS)}")
    if int(jobs) != jobs or jobs < 1:
        raise ConfigError(f"--jobs must be a whole number >= 1 (processes training cells at once), got {jobs}")
    jobs = int(jobs)
    configs, notes = plan(modes, seeds, values)
    if not configs:
        raise ConfigError(f"nothing to run: {'; '.join(notes) or 'no modes'}")
    for note in notes:
        echo(f"note: {note}")
    teacher_arch = precheck(configs)
    base = Config(**{k: v for k, v in values.items()})
    params = {"modes": modes, "seeds": int(seeds), "register": int(bool(register)), "jobs": jobs,
              **{k: getattr(base, k) for k in BENCHMARK_FIELDS}}
    tags = {"mode": "benchmark", "dataset": base.dataset, "student": base.student,
            "teacher": teacher_arch or base.teacher,
            "benchmark_modes": ",".join(dict.fromkeys(c.mode for c in configs)),
            **({"benchmark_notes": " | ".join(notes)} if notes else {})}
    client = mlflow.MlflowClient()
    with start_run(params, tags, run_name=f"benchmark-{base.dataset}-{base.student}") as parent:
        experiment_id = client.get_run(parent.run_id).info.experiment_id
        experiment = client.get_experiment(experiment_id).name
        result = BenchmarkResult(parent.run_id, experiment, notes=notes)
        existing = counted_runs(search_all_runs(client, experiment_id), skip_run_ids={parent.run_id})
        counts = train_pairs(configs, parent, result, existing=existing, register=register, echo=echo,
                             on_registered=lambda name: update_champion(client, name), jobs=jobs)
        parent.log_metrics({"pairs_trained": len(result.trained), "pairs_skipped": len(result.skipped),
                            "pairs_failed": len(result.failed), **(counts.metrics() if counts else {})})
        if result.failed:
            parent.set_tags({"failed_pairs": ", ".join(f"{p.mode}/seed{p.seed}" for p in result.failed)})
        with child_run(parent, f"compare-{experiment}", {"compared_experiment": experiment},
                       {"mode": "compare", "benchmark_run_id": parent.run_id}) as tracker:
            comparison = compare_experiment(experiment, client, skip_run_ids={tracker.run_id})
            log_comparison(comparison, tracker)
            result.comparison, result.compare_run_id = comparison, tracker.run_id
        parent.set_tags({"compare_run_id": result.compare_run_id})
    echo(comparison.markdown)
    echo(f"benchmark run {result.run_id} in experiment {experiment!r}: {len(result.trained)} trained, "
         f"{len(result.skipped)} skipped (already finished), {len(result.failed)} failed; "
         f"comparison in run {result.compare_run_id}")
    for note in notes:
        echo(f"note: {note}")
    if result.failed:
        echo("failed pairs (run the same command again to retry only these): "
             + "; ".join(f"{p.mode} seed {p.seed}: {p.error}" for p in result.failed))
    return result
