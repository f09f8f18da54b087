"""Run lifecycle: which experiment a run goes to (and refusing ``-P experiment`` that
``mlflow run`` cannot honour), opening or adopting the run (``start_run``), its name,
its git commit and code version, and its heartbeat while it is open."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

from ..errors import ConfigError
from .health import _is_http, _request_kwargs, check_tracking_server
from .tracker import MlflowTracker, _lifecycle

DEFAULT_EXPERIMENT = "kd-mlflow"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_PACKAGE_ROOT, capture_output=True,
                             text=True, timeout=5)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_PACKAGE_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def code_version() -> str:
    """A digest of the package's source (every .py under kd_mlflow/, path and bytes): the
    code a run's numbers come from, whether or not it is a git checkout, and unchanged by
    edits outside the package (README, tests, docs)."""
    package = _PACKAGE_ROOT / "kd_mlflow"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _select_experiment(experiment: str) -> None:
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        # the run exists already; its experiment was chosen by `mlflow run`
        check_launcher_experiment(experiment)
        return
    if experiment:
        mlflow.set_experiment(experiment)
    elif not (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
        mlflow.set_experiment(DEFAULT_EXPERIMENT)


_LAUNCHER_EXPERIMENT_OK: set = set()  # (run id, experiment) pairs already checked in this process


def check_launcher_experiment(experiment: str) -> None:
    """Under ``mlflow run``: refuse ``-P experiment=X`` when X is not the experiment of the
    run MLflow has already created (--experiment-name, MLFLOW_EXPERIMENT_NAME, or Default).
    A run cannot move between experiments, and training elsewhere would leave MLflow's run
    behind as an empty duplicate; so: one line saying what to type instead (ConfigError,
    exit 2) and that run marked FAILED, with the line as its description. Config.validate
    calls this before any work; an empty X, or X naming (or numbering) that experiment, passes."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT, MLFLOW_RUN_NOTE

    launcher = os.environ.get("MLFLOW_RUN_ID")
    if not experiment or not launcher or (launcher, experiment) in _LAUNCHER_EXPERIMENT_OK:
        return
    check_tracking_server()
    client = mlflow.MlflowClient()
    run = client.get_run(launcher)
    chosen = client.get_experiment(run.info.experiment_id)
    if experiment in (chosen.name, chosen.experiment_id):
        _LAUNCHER_EXPERIMENT_OK.add((launcher, experiment))
        return
    entry = run.data.tags.get(MLFLOW_PROJECT_ENTRY_POINT, "main")
    message = (f"-P experiment={experiment} cannot take effect: `mlflow run` has already created this run in "
               f"experiment {chosen.name!r}, and a run cannot move; choose the experiment with "
               f"`mlflow run . -e {entry} --experiment-name {experiment}` (without -P experiment)")
    with contextlib.suppress(Exception):
        client.set_tag(launcher, MLFLOW_RUN_NOTE, message)
        client.set_terminated(launcher, "FAILED")
    raise ConfigError(message)


def is_mlflow_generated_name(name: str | None) -> bool:
    """Whether ``name`` is one MLflow made up for a run nobody named (``gifted-auk-847``:
    a predicate and a noun of its word lists and a number, cut at 20 characters).

    `mlflow run --run-name NAME` leaves no other trace: MLflow creates the run with such a
    name and sets NAME as the tag mlflow.runName just after it starts the entry point. So a
    run still carrying a made-up name when kd-mlflow adopts it gets kd-mlflow's name, and a
    user's NAME is kept (set later, it overwrites ours anyway). A user who picks a name of
    exactly MLflow's shape from its own word lists is renamed; nobody else is."""
    import re

    if not name:
        return True
    try:
        from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES
    except ImportError:  # MLflow moved its word lists: judge by the shape alone
        return re.fullmatch(r"[a-z]+-[a-z]+-\d{1,4}", name) is not None
    predicates = {w.lower() for w in _GENERATOR_PREDICATES}
    nouns = {w.lower() for w in _GENERATOR_NOUNS}
    predicate, _, rest = name.partition("-")
    if predicate not in predicates:
        return False
    if re.fullmatch(r"[a-z]+-\d{1,4}", rest) and rest.split("-")[0] in nouns:
        return True
    # MLflow cuts a name longer than 20 characters to 20: the cut rest must begin a noun-number
    return len(name) == 20 and any(f"{noun}-".startswith(rest) or
                                   re.fullmatch(re.escape(noun) + r"-\d{0,4}", rest) for noun in nouns)


HEARTBEAT_TAG = "kd_mlflow.heartbeat"  # ms since the epoch: the run's process was alive then
HEARTBEAT_SECONDS = 60.0


@contextlib.contextmanager
def _heartbeat(run_ids):
    """Set HEARTBEAT_TAG on ``run_ids`` now and every HEARTBEAT_SECONDS while the body runs,
    from a daemon thread: MLflow has no sign that a RUNNING run's process still lives, and
    `kd-mlflow runs clean` needs one to tell a dead run from a long epoch. Best effort: a
    beat the server misses (outage) is skipped, never waited for."""
    import mlflow

    uri, run_ids = mlflow.get_tracking_uri(), [r for r in dict.fromkeys(run_ids) if r]
    stop = threading.Event()

    def beat() -> None:
        stamp = str(int(time.time() * 1000))
        for run_id in run_ids:
            with contextlib.suppress(Exception):
                if _is_http(uri):  # one plain request: none of MLflow's retries, nothing logged when it fails
                    import requests

                    requests.post(uri.rstrip("/") + "/api/2.0/mlflow/runs/set-tag", timeout=5,
                                  json={"run_id": run_id, "key": HEARTBEAT_TAG, "value": stamp},
                                  **_request_kwargs())
                else:
                    mlflow.MlflowClient(uri).set_tag(run_id, HEARTBEAT_TAG, stamp)

    def loop() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            beat()

    beat()
    thread = threading.Thread(target=loop, name="kd-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)  # a beat stuck on an absent server is left to die with the process


@contextlib.contextmanager
def start_run(params: dict, tags: dict, run_name: str | None = None, run_id: str | None = None):
    """Open (or, under ``mlflow run``, adopt) the run; log params and tags; yield a tracker.

    The run is called ``run_name`` (``<mode>-<student>``), an adopted one too unless it has a
    name of its own (`mlflow run --run-name`, see is_mlflow_generated_name); while it is open
    it beats (``kd_mlflow.heartbeat``) so that `kd-mlflow runs clean` knows it is alive.

    An exception inside marks the run FAILED and stores the traceback as an artifact;
    Ctrl-C marks it KILLED. No error path leaves a run RUNNING."""
    import mlflow

    check_tracking_server()  # compare and benchmark come here without passing the runner's check
    _select_experiment(params.get("experiment", ""))
    launcher_run = os.environ.get("MLFLOW_RUN_ID")
    if run_id and launcher_run and launcher_run != run_id:
        # `mlflow run -P resume=ID` made a fresh run; the training continues in run ID.
        mlflow.MlflowClient().set_tag(launcher_run, "kd_mlflow.resumed_run_id", run_id)
    run_id = run_id or launcher_run
    if run_id and not is_mlflow_generated_name(mlflow.MlflowClient().get_run(run_id).info.run_name):
        run_name = None  # `mlflow run --run-name`'s, or the name the resumed run has: it stays
    run = mlflow.start_run(run_id=run_id, run_name=run_name)  # an adopted run is renamed in place
    tracker = MlflowTracker(run.info.run_id)
    with contextlib.suppress(Exception):
        tracker.offline.record["experiment_name"] = mlflow.get_experiment(run.info.experiment_id).name
    with _lifecycle(tracker) as tracker, _heartbeat([run.info.run_id, launcher_run]):
        if run_id:
            # `mlflow run` has already logged the entry point's parameters (as the user
            # typed them, e.g. lr=.1 or '' for empty); MLflow forbids changing a param,
            # so only what it did not log is added.
            params = {k: v for k, v in params.items() if k not in run.data.params}
        tracker.log_params(params)
        tracker.set_tags({**tags, "git_commit": git_commit()})
        yield tracker
