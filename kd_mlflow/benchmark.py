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

from .config import COMMON_FIELDS, Config, ConfigError
from .analysis.runs import settings_match
from .modes import DISTILLATION_MODES, MODES

# Config fields a benchmark takes (everything else: each mode's own defaults).
# The strategies' inputs (teachers, the kdparam grid) and labeled_fraction apply to the modes
# that have them; a benchmark of the committed teachers needs no teacher training.
BENCHMARK_FIELDS = ("dataset", "student", "teacher", "teacher_checkpoint", "ensemble", "teachers", "temperatures",
                    "alphas", "labeled_fraction", "epochs", "batch_size", "lr", "train_subset", "val_size",
                    "test_subset", "device", "precision", "threads", "teacher_cache", "data_dir", "experiment")
# Params that say where or how a run ran, not what it computed: a finished run that
# differs only in these still counts as done.


@dataclass
class Pair:
    mode: str
    seed: int
    run_id: str = ""
    test_acc: float | None = None
    error: str = ""
    metrics: dict = field(default_factory=dict)
    cfg: object = None


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


def check_fields(command: str, values: dict) -> None:
    """A multi-run command takes the Config fields in BENCHMARK_FIELDS and nothing else."""
    unknown = set(values) - set(BENCHMARK_FIELDS)
    if unknown:
        raise ConfigError(f"{command} does not take {', '.join(sorted(unknown))}; it takes: "
                          f"{', '.join(BENCHMARK_FIELDS)}")


def check_single_training(mode: str, does: str) -> None:
    """``mode`` is one training (a distiller), as a sweep or a search needs; ``does``:
    what the command does with it ("sweep trains", "tune searches")."""
    if mode not in MODES or MODES[mode].kind != "distiller":
        singles = [m for m, spec in MODES.items() if spec.kind == "distiller"]
        raise ConfigError(f"{does} single-training modes; {mode!r} is not one of: {', '.join(singles)}")


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


def plan(modes: str, seeds: int, values: dict, first_seed: int = 0) -> tuple[list[Config], list[str]]:
    """-> (validated Configs for seeds first_seed..first_seed+seeds-1, seed-major; notes about
    modes left out). Fails with a ConfigError naming the mode before anything runs."""
    if int(seeds) < 1:
        raise ConfigError(f"seeds must be >= 1 (the number of seeds: 0..N-1), got {seeds}")
    if int(first_seed) < 0:
        raise ConfigError(f"first_seed must be >= 0, got {first_seed}")
    chosen = parse_modes(modes)
    notes = []
    for mode in list(chosen):
        if MODES[mode].needs:
            name, note = MODES[mode].needs
            if not Config.for_mode(mode, **{name: values.get(name, "")}).list_of(name):
                chosen.remove(mode)
                notes.append(f"{mode} skipped: {note}")
    configs = []
    for seed in range(int(first_seed), int(first_seed) + int(seeds)):
        for mode in chosen:
            cfg = Config.for_mode(mode, **Config.taken_by(mode, values), seed=seed)
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


@contextlib.contextmanager
def child_run(parent, name: str, params: dict, tags: dict, *, register: bool = True):
    """A run nested under the benchmark's run (``parent``, a tracker), with the same
    guarantees as every run: params logged, never left RUNNING."""
    from .execution import _child

    with _child(parent, name, params, tags, None, register) as tracker:
        yield tracker


def train_pairs(configs: list[Config], parent, result, *, existing=(), register: bool = False,
                echo=print, on_registered=None, opts=None, kind: str = "benchmark", name=None, tags=None):
    """Train each pair of ``configs`` as a run nested under ``parent`` (a tracker), except
    those already finished in ``existing`` runs, into ``result``'s trained, skipped and
    failed lists, through the execution layer (execution/: in this process, or on Ray) ->
    the teacher cache's counters, added up (None when teacher_cache is off).

    Pairs run seed-major. The pairs a process trains in turn share its teacher cache: the
    modes of one seed that run the same teacher on the same batches (kd, triplet, dkd,
    dist, multikd's members, takd's first link) run it once; the cache is emptied when the
    seed changes. ``name(cfg)`` and ``tags(cfg)``: the cell's run name and extra tags."""
    from .execution import Cell, Job, Options, execute

    opts = opts or Options()
    parent_run_id = parent.run_id
    name = name or (lambda cfg: f"{cfg.mode}-seed{cfg.seed}")
    tags = tags or (lambda cfg: {"benchmark_run_id": parent_run_id, "seed": str(cfg.seed)})
    total = len(configs)
    cells = []
    for i, cfg in enumerate(configs, start=1):
        done = finished_run_for(existing, cfg)
        if done is None:
            cells.append(Cell(i, cfg, name(cfg), tags(cfg)))
            continue
        result.skipped.append(Pair(cfg.mode, cfg.seed, done.info.run_id, done.data.metrics.get("test_acc"),
                                   metrics=dict(done.data.metrics), cfg=cfg))
        echo(f"[{i}/{total}] {name(cfg)}: skipped, finished as run {done.info.run_id} "
             f"(test_acc {done.data.metrics['test_acc']:.2f}%)")

    def started(cell, where: str) -> None:
        echo(f"[{cell.index}/{total}] {cell.name}: training{' (' + where + ')' if where else ''}")

    def finished(cell, out) -> None:
        label = f"[{cell.index}/{total}] {cell.name}"
        if out.error:  # one broken mode must not cost the others; listed at the end
            result.failed.append(Pair(cell.cfg.mode, cell.cfg.seed, error=out.error, cfg=cell.cfg))
            echo(f"{label}: FAILED ({out.error})")
            return
        if register and out.registered_model and on_registered is not None:
            on_registered(out.registered_model)
        result.trained.append(Pair(cell.cfg.mode, cell.cfg.seed, out.run_id, out.test_acc,
                                   metrics={"test_acc": out.test_acc, "test_acc_last": out.test_acc_last,
                                            "best_val_acc": out.best_val_acc}, cfg=cell.cfg))
        resumed = f", continued from its checkpoint" if out.resumed else ""
        node = f" on {out.node}" if out.node else ""
        echo(f"{label}: test_acc {out.test_acc:.2f}% (run {out.run_id}{resumed}{node})")

    counts = execute(cells, Job(parent_run_id, kind, register=register, storage=opts.storage, parent=parent), opts,
                     on_start=started, on_done=finished, echo=echo)
    return counts or None


def run_benchmark(modes: str = "all", seeds: int = 3, register: bool = False, echo=print, jobs: int = 1,
                  ray_address: str = "", cpus_per_cell: float = 0, gpus_per_cell: float = -1, storage: str = "",
                  first_seed: int = 0, **values) -> BenchmarkResult:
    """Train ``modes`` x ``seeds`` (skipping pairs already finished with the same
    settings), ``jobs`` at a time (execution.Options: in this process, or on Ray), then
    compare. ``values``: the Config fields in BENCHMARK_FIELDS."""
    from .execution import Options, check_options

    from .analysis.compare import compare_experiment
    from .analysis.runs import counted_runs
    from .analysis.report import log_comparison
    from .tracking import start_run
    from .tracking.queries import client as tracking_client
    from .tracking.queries import experiment_of_run, search_all_runs
    from .tracking.registry import update_champion

    check_fields("benchmark", values)
    opts = Options(jobs, ray_address, cpus_per_cell, gpus_per_cell, storage)
    check_options(opts)
    jobs = int(jobs)
    configs, notes = plan(modes, seeds, values, first_seed)
    if not configs:
        raise ConfigError(f"nothing to run: {'; '.join(notes) or 'no modes'}")
    for note in notes:
        echo(f"note: {note}")
    teacher_arch = precheck(configs)
    base = Config(**{k: v for k, v in values.items() if k in COMMON_FIELDS})
    params = {"modes": modes, "seeds": int(seeds), "first_seed": int(first_seed), "register": int(bool(register)),
              "jobs": jobs,
              **opts.params(),
              **{k: values[k] if k in values else Config.parameter(k).default for k in BENCHMARK_FIELDS}}
    tags = {"mode": "benchmark", "dataset": base.dataset, "student": base.student,
            "teacher": teacher_arch or base.teacher,
            "benchmark_modes": ",".join(dict.fromkeys(c.mode for c in configs)),
            **({"benchmark_notes": " | ".join(notes)} if notes else {})}
    client = tracking_client()
    with start_run(params, tags, run_name=f"benchmark-{base.dataset}-{base.student}") as parent:
        experiment_id, experiment = experiment_of_run(client, parent.run_id)
        result = BenchmarkResult(parent.run_id, experiment, notes=notes)
        existing = counted_runs(search_all_runs(client, experiment_id), skip_run_ids={parent.run_id})
        counts = train_pairs(configs, parent, result, existing=existing, register=register, echo=echo,
                             on_registered=lambda name: update_champion(client, name), opts=opts)
        parent.log_metrics({"pairs_trained": len(result.trained), "pairs_skipped": len(result.skipped),
                            "pairs_failed": len(result.failed), **(counts or {})})
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
