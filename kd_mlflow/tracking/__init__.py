"""All of MLflow lives here. Everything else receives a tracker with a few methods, or reads
runs through ``queries``.

Run ownership: under ``mlflow run`` the entry point logs into the run MLflow created
(``MLFLOW_RUN_ID``), never a second top-level run; launched directly, we create it.
Multi-stage modes open nested child runs with ``tracker.child(...)``.

Outages: a remote tracking server must answer when a run starts (``check_tracking_server``).
If it goes away later, training goes on: metrics wait in a bounded in-process buffer that
a background thread delivers when the server is back; calls at the end of a training
wait for it (``KD_TRACKING_OUTAGE_WAIT`` seconds, default 300), and if it never returns
everything not delivered goes to ``runs/<run_id>/offline/`` for ``kd-mlflow sync``.
A nested run opened then (a sweep's next stage) is created offline, under an id of its
own, and lives there entirely; sync creates it under its parent.

One file per job:

- ``health.py``: the server check before a run, the health probe and outage wait,
  credentials, and ``redact`` (how a server URI is shown to people);
- ``offline.py``: the offline directory and its record format (shared with sync.py);
- ``metrics.py``: the bounded metric buffer and its delivery thread;
- ``tracker.py``: ``MlflowTracker`` (params, tags, metrics, artifacts, datasets,
  log_model + registry, system metrics, nested runs) and ``NullTracker``;
- ``lifecycle.py``: ``start_run`` (experiment choice, adopting ``mlflow run``'s run,
  its name, git commit and heartbeat);
- ``resume.py``: which run a ``resume`` parameter continues.
- ``queries.py``: reading runs, experiments and artifacts for analysis (compare, benchmark,
  sweep) and for fetching models;
- ``registry.py``: registered versions, their descriptions, the champion alias, pull;
- ``serving.py`` and ``pyfunc_images.py``: what a logged student carries, and the python
  function that serves raw images (copied into every logged model's code/);
- ``sync.py``: ``kd-mlflow sync`` of offline runs; ``cleanup.py``: ``kd-mlflow runs clean``
  and the runs/ working directories.

No other module of the package imports mlflow (tests/test_layout.py checks).

Module state a test may replace (``offline.OFFLINE_DIRS``, ``metrics.MAX_BUFFERED_METRICS``)
is not re-exported here: patch it in its own module, where it is read.
"""

from .health import (
    check_tracking_server,
    outage_wait_seconds,
    redact,
    server_up,
    shown_registry_uri,
    shown_tracking_uri,
    worker_environment,
)
from .lifecycle import (
    DEFAULT_EXPERIMENT,
    HEARTBEAT_SECONDS,
    HEARTBEAT_TAG,
    check_launcher_experiment,
    code_version,
    git_commit,
    is_mlflow_generated_name,
    start_run,
)
from .offline import OFFLINE_ROOT
from .resume import (CELL_TAG, MODEL_CARD, adopt_cell_run, finished_cells_of_stopped_parents,
                     kill_unfinished_children, mark_pruned, resumable_run, run_summary, unfinished_cell_runs)
from .tracker import (SYSTEM_METRICS_INTERVAL, MlflowTracker, NullTracker, dataset_inputs, pip_requirements,
                      record_failure)

# The pieces the buffer tests build by hand (tests/test_tracking_buffer.py).
from .health import _Link  # noqa: F401,E402
from .metrics import _MetricBuffer  # noqa: F401,E402
from .offline import _Offline  # noqa: F401,E402

__all__ = [
    "CELL_TAG", "MODEL_CARD", "adopt_cell_run", "finished_cells_of_stopped_parents", "kill_unfinished_children",
    "mark_pruned", "run_summary", "unfinished_cell_runs",
    "DEFAULT_EXPERIMENT", "HEARTBEAT_SECONDS", "HEARTBEAT_TAG", "OFFLINE_ROOT", "SYSTEM_METRICS_INTERVAL",
    "MlflowTracker", "NullTracker", "check_launcher_experiment", "check_tracking_server", "code_version", "dataset_inputs",
    "git_commit", "is_mlflow_generated_name", "record_failure", "outage_wait_seconds", "pip_requirements", "redact",
    "resumable_run", "server_up", "shown_registry_uri", "shown_tracking_uri", "start_run", "worker_environment",
]
