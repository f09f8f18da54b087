"""A cell of a multi-run job, and how one is trained wherever it runs: the options, the job,
the worker set-up, and the nested run of one cell (the same on every path)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError

RETRIES = 3  # attempts after a lost worker process or node, per cell


@dataclass
class Cell:
    """One training of a job: ``cfg`` as the nested run ``name`` under the job's parent."""

    index: int  # 1-based position in the job, for progress lines
    cfg: Config
    name: str  # the run name, unique within the job (e.g. kd-seed0)
    tags: dict = field(default_factory=dict)

    def key(self, job: str) -> str:
        return f"{job}:{self.name}"


@dataclass
class Outcome:
    """What a cell reports back: its run and numbers, or the one-line reason it failed."""

    index: int
    run_id: str = ""
    test_acc: float | None = None
    test_acc_last: float | None = None
    best_val_acc: float | None = None
    registered_model: str | None = None
    error: str = ""
    resumed: str = ""  # the unfinished run it continued, if any
    adopted: str = ""  # the finished run of a stopped parent it took over instead of training, if any
    counts: dict = field(default_factory=dict)  # teacher cache counters of this cell
    node: str = ""
    # what a strategy needs to register the cell it selects (kdparam's grid)
    best_epoch: int | None = None
    test_correct: int | None = None
    test_images: int | None = None
    model_uri: str | None = None
    card: dict | None = None
    checkpoint: str = ""


# The command-line options of every multi-run command: name -> (type, default, help).
OPTIONS = {
    "jobs": (int, 1, "Cells trained at once. 1 with no Ray address: one after another in this process "
                     "(no Ray). More: on a local Ray sized to this machine; 0 = as many as the CPUs and GPUs "
                     "allow. Each cell keeps its --threads, so --jobs changes no number."),
    "ray_address": (str, "", "A Ray cluster to run the cells on (`ray start --head` prints it; default "
                             "$RAY_ADDRESS). Its nodes need this package, the data, a tracking server they reach "
                             "and --storage."),
    "cpus_per_cell": (float, 0, "CPUs Ray reserves per cell; 0 = the cell's threads (no oversubscription)."),
    "gpus_per_cell": (float, -1, "GPUs Ray reserves per cell; fractions pack small students on one card "
                                 "(0.25 = four per GPU); -1 = 1 where the cluster has GPUs, else 0."),
    "storage": (str, "", "Where cells keep epoch checkpoints ('' = ./runs); on a cluster, a path every node "
                         "mounts, so a retried cell continues from its checkpoint on another node."),
}


@dataclass
class Options:
    """How the cells of a job are spread (never what they compute)."""

    jobs: int = 1  # cells in flight at once
    ray_address: str = ""  # '' = RAY_ADDRESS, else a local Ray when jobs > 1
    cpus_per_cell: float = 0  # 0 = the threads each cell trains with
    gpus_per_cell: float = -1  # -1 = 1 when the cell trains on a GPU, else 0
    storage: str = ""  # where epoch checkpoints live ('' = ./runs); every node must read it

    def address(self) -> str:
        return self.ray_address or os.environ.get("RAY_ADDRESS", "")

    def params(self) -> dict:
        """How the job ran, for its parent run's params (the cells log what they computed)."""
        from ..tracking import redact

        return {"ray_address": redact(self.address()), "cpus_per_cell": self.cpus_per_cell,
                "gpus_per_cell": self.gpus_per_cell, "storage": self.storage}

    def uses_ray(self, cells: int) -> bool:
        return bool(self.address()) or (self.jobs != 1 and cells > 1)


def check_options(opts: Options) -> None:
    """One line for each thing that cannot work, before any run is created."""
    from ..tracking import shown_tracking_uri

    if int(opts.jobs) != opts.jobs or opts.jobs < 0:
        raise ConfigError(f"--jobs must be a whole number >= 0 (cells trained at once; 0 = as many as Ray's "
                          f"CPUs and GPUs allow), got {opts.jobs}")
    if opts.cpus_per_cell < 0:
        raise ConfigError(f"--cpus-per-cell must be >= 0 (0 = the cell's threads), got {opts.cpus_per_cell}")
    if opts.gpus_per_cell != -1 and opts.gpus_per_cell < 0:
        raise ConfigError(f"--gpus-per-cell must be >= 0 (e.g. 0.25 packs 4 cells on one GPU), got "
                          f"{opts.gpus_per_cell}")
    if opts.gpus_per_cell > 1 and opts.gpus_per_cell != int(opts.gpus_per_cell):
        raise ConfigError(f"--gpus-per-cell above 1 must be whole (a cell trains on one device), got "
                          f"{opts.gpus_per_cell}")
    if opts.address():
        uri = tracking_uri()
        if not uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql", "databricks")):
            raise ConfigError(f"a Ray cluster's workers cannot reach the tracking store {shown_tracking_uri()}: "
                              f"set MLFLOW_TRACKING_URI to a server every node reaches (e.g. "
                              f"http://HEAD:5000, from `mlflow server` on the head node)")
        if not opts.storage or not Path(opts.storage).is_absolute():
            raise ConfigError("a Ray cluster's workers cannot read this machine's ./runs: pass --storage "
                              "/a/path/every/node/mounts (a shared file system) for the cells' checkpoints")
    if opts.storage:
        from ..config import unwritable_reason

        reason = unwritable_reason(Path(opts.storage), "-storage-check")
        if reason:
            raise ConfigError(f"--storage {opts.storage} is not writable: {reason}")


def tracking_uri() -> str:
    from ..tracking import worker_environment

    return worker_environment()["MLFLOW_TRACKING_URI"]


# ------------------------------------------------------------------ one cell, wherever it runs
_cache_session = None  # this process's teacher cache, shared by the cells it trains in turn
_cache_seed = None


def _cache_counts(enabled: bool, seed: int):
    """The teacher cache of this process (a benchmark in-process, or a Ray worker that
    trains cells one after another): modes of one seed that run the same teacher on the
    same batches compute it once; a new seed never sees the same batches, so it is emptied."""
    global _cache_session, _cache_seed
    from ..teachers import cache as teacher_cache

    if not enabled:
        return None
    if _cache_session is None:
        session = teacher_cache.session(True)
        _cache_session = (session, session.__enter__())
    counts = _cache_session[1]
    if seed != _cache_seed:
        counts.cache.clear()
        _cache_seed = seed
    return counts


def close_cache() -> None:
    global _cache_session, _cache_seed
    if _cache_session is not None:
        session, _ = _cache_session
        _cache_session, _cache_seed = None, None
        session.__exit__(None, None, None)


@dataclass
class Job:
    """What every cell of a job shares: its parent run, its kind and where it keeps files."""

    parent_run_id: str
    kind: str  # benchmark, sweep, tune: the cell tag's prefix
    register: bool = False
    storage: str = ""
    workdir: str = ""  # the driver's working directory (pretrained/, relative paths)
    parent: object = None  # the parent's tracker, for cells trained in this process (never sent to Ray)
    # a strategy's cells: take over the cell's finished run from a stopped earlier run of the
    # same strategy (tracking.finished_cells_of_stopped_parents) instead of training it again
    adopt_finished: bool = False


def run_cell_here(cell: Cell, job: Job, wrap=None) -> Outcome:
    """Train one cell in this process as a run nested under the job's parent, continuing
    the cell's unfinished run if a lost or stopped attempt left one with a checkpoint."""
    from ..tracking import cleanup

    runs_dir = cleanup.RUNS_DIR
    if job.storage:
        cleanup.RUNS_DIR = Path(job.storage)
    try:
        return _run_cell(cell, job, wrap)
    finally:
        cleanup.RUNS_DIR = runs_dir


def _run_cell(cell: Cell, job: Job, wrap=None) -> Outcome:
    from .. import runner
    from ..tracking import (CELL_TAG, MlflowTracker, adopt_cell_run, cleanup, code_version,
                            finished_cells_of_stopped_parents, redact, unfinished_cell_runs)

    parent = job.parent if job.parent is not None else MlflowTracker(job.parent_run_id)
    key = cell.key(job.kind)
    cfg = cell.cfg
    resumed = ""
    tracked = isinstance(getattr(parent, "_inner", parent), MlflowTracker) and not parent.offline.record.get(
        "created_offline")

    def same_cell(run) -> bool:  # this cell's numbers: made by this code, with these settings
        return run.data.tags.get("code_version") == code_version() and _same_settings(run, cfg)

    for run in finished_cells_of_stopped_parents(job.parent_run_id, key) if tracked and job.adopt_finished else []:
        if same_cell(run):
            adopted = adopt_cell_run(run, job.parent_run_id)
            if adopted is not None:
                m = run.data.metrics
                return Outcome(cell.index, run.info.run_id, m.get("test_acc"), m.get("test_acc_last"),
                               m.get("best_val_acc"), adopted=run.info.run_id,
                               best_epoch=int(m["best_epoch"]) if "best_epoch" in m else None,
                               test_correct=int(m["test_correct"]) if "test_correct" in m else None,
                               test_images=int(m["test_images"]) if "test_images" in m else None,
                               model_uri=adopted[0], card=adopted[1])
    for run in unfinished_cell_runs(job.parent_run_id, key) if tracked else []:
        if same_cell(run) and (cleanup.RUNS_DIR / run.info.run_id / "last.pt").is_file():
            resumed = run.info.run_id
            cfg = cfg.replace(resume=resumed)
            break
    tags = {**cell.tags, CELL_TAG: key}
    counts = _cache_counts(cfg.teacher_cache, cfg.seed)
    before = counts.metrics() if counts is not None else {}

    def factory(params, run_tags, run_name=None, run_id=None, **_):
        return _child(parent, cell.name, params, {**run_tags, **tags}, run_id, job.register, wrap)

    try:
        res = runner.run(cfg, tracker_factory=factory)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        text = redact(str(exc)).strip()
        return Outcome(cell.index, error=f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}",
                       resumed=resumed)
    after = counts.metrics() if counts is not None else {}
    return Outcome(cell.index, res.run_id or "", res.test_acc, res.test_acc_last, res.best_val_acc,
                   res.registered_model, resumed=resumed, counts={k: after[k] - before.get(k, 0) for k in after},
                   best_epoch=res.best_epoch, test_correct=res.test_correct, test_images=res.test_images,
                   model_uri=res.model_uri, card=res.card, checkpoint=str(res.checkpoint))


def _same_settings(run, cfg: Config) -> bool:
    from ..analysis.runs import settings_match

    return settings_match(run, cfg)


class _Unregistered:
    """A tracker that logs models but registers none (a job's cells are measurements;
    ``register=1`` turns registration back on)."""

    def __init__(self, inner):
        self._inner = inner
        self.run_id = inner.run_id

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def log_model(self, model, example, *, registered_name=None, **kwargs):
        return self._inner.log_model(model, example, registered_name=None, **kwargs)

    def register(self, model_uri, name, card=None):
        return None

    def child(self, name, tags=None, run_id=None):
        import contextlib

        @contextlib.contextmanager
        def opened():
            with self._inner.child(name, tags, run_id) as inner:
                yield _Unregistered(inner)

        return opened()


def _child(parent, name: str, params: dict, tags: dict, run_id, register: bool, wrap=None):
    """The cell's run: nested under ``parent`` (a tracker), params logged, never left RUNNING."""
    import contextlib

    from ..tracking import git_commit

    @contextlib.contextmanager
    def opened():
        opened_child = parent.child(name, {**tags, "git_commit": git_commit()}) if run_id is None else \
            parent.child(name, {**tags, "git_commit": git_commit()}, run_id)
        with opened_child as tracker:
            tracker.log_params(params)
            tracker = tracker if register else _Unregistered(tracker)
            yield wrap(tracker) if wrap is not None else tracker

    return opened()


# ------------------------------------------------------------------ many cells
def add_counts(totals: dict, outcome: Outcome) -> None:
    """A cell's teacher cache counters added to the job's."""
    for k, v in outcome.counts.items():
        totals[k] = totals.get(k, 0) + v


def enter_worker(job: Job, env: dict, driver_code: str) -> str:
    """Make this Ray worker process (a cell's task or a tune trial) see what the driver
    sees -> "" or the one line why it must not train: its tracking store and credentials,
    the driver's working directory where this node shares it, and the driver's code."""
    import socket

    from ..tracking import code_version
    from ..tracking.queries import use_tracking_uri

    os.environ.update(env)
    # Under `mlflow run` the launcher's run id reaches local workers; a cell opens its own
    # nested run, never adopts the job's.
    os.environ.pop("MLFLOW_RUN_ID", None)
    if job.workdir and os.path.isdir(job.workdir):
        os.chdir(job.workdir)  # pretrained/ and relative paths, where the nodes share it
    use_tracking_uri(env["MLFLOW_TRACKING_URI"])
    if code_version() != driver_code:
        return (f"node {socket.gethostname()} runs other kd_mlflow code (code_version {code_version()[:12]}, "
                f"the driver's {driver_code[:12]}): install the same version on every node")
    return ""
