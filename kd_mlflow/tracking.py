"""All of MLflow lives here. Everything else receives a tracker with a few methods.

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
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

DEFAULT_EXPERIMENT = "kd-mlflow"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ROOT = Path("runs")  # the runner's working directory for per-run files
SYSTEM_METRICS_INTERVAL = 10.0  # seconds between samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides)
MAX_BUFFERED_METRICS = 100_000  # beyond this, the oldest buffered points go to the fallback file


def dataset_inputs(datasets: list) -> list:
    """MLflow DatasetInputs for data.DataBundle.datasets() entries: metadata only (the
    images stay where they are), with the split as MLflow's dataset context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                 source=json.dumps({"uri": d["source"]}),
                                 profile=json.dumps({"num_rows": d["rows"], "image": d["image"],
                                                     "indices_into": f"the {d['file']} file"})),
                         tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]


class NullTracker:
    """Tracker that records nothing (benchmarks measure the trainer without MLflow)."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def backfill(self, history: list) -> None: ...
    def log_dict(self, obj, path: str) -> None: ...
    def log_figure(self, fig, path: str) -> None: ...
    def log_artifact(self, local_path, artifact_path: str | None = None) -> None: ...
    def log_datasets(self, datasets: list) -> None: ...
    def monitor_system(self, interval: float = 0) -> None: ...

    def log_model(self, *args, **kwargs):
        return None, None

    def register(self, model_uri: str, name: str, card: dict | None = None):
        return None

    @contextlib.contextmanager
    def child(self, name: str, tags: dict | None = None):
        yield self


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


def pip_requirements() -> list[str]:
    import mlflow
    import numpy
    import pandas
    import torch

    # pandas: the image pyfunc answers with a DataFrame (pyfunc_images.py)
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}"]


def _warm_model_logging() -> None:
    """The one-off costs of the first log_model in a process, paid on a side thread
    while the epochs train (torch ops release the GIL) instead of at the end: the
    imports behind torch.export (pt2 tracing pulls in torch._dynamo), the plotting stack,
    and MLflow's map of installed distributions (a scan of every installed file, which
    MLflow caches)."""
    with contextlib.suppress(Exception):
        import importlib

        importlib.import_module("mlflow.pytorch")
        importlib.import_module("torch.export._trace")
        importlib.import_module("kd_mlflow.plots")  # seaborn and scipy, for the end-of-run figures
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()


# ------------------------------------------------------------------ server health
def redact(text: str) -> str:
    """``text`` (a URI, or any message that may hold some, such as an MLflow error) with the
    password of every URI in it replaced by *** (in an http(s) URI a lone user part, often
    a token, too): safe to print and to log. The one place that renders a server for people."""
    import re

    def hide(match) -> str:
        scheme, userinfo = match.group(1), match.group(2)
        if ":" in userinfo:
            return f"{scheme}://{userinfo.split(':', 1)[0]}:***@"
        return f"{scheme}://***@" if scheme.lower() in ("http", "https") else match.group(0)

    # the user part ends at the netloc's last "@", as urlsplit reads it
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#\s]*)@", hide, text)


def shown_tracking_uri() -> str:
    """The current tracking URI as messages show it (password masked)."""
    import mlflow

    return redact(mlflow.get_tracking_uri())


def shown_registry_uri() -> str:
    """The current registry URI as messages show it (password masked)."""
    import mlflow

    return redact(mlflow.get_registry_uri())


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _request_kwargs() -> dict:
    """Credentials and TLS settings from MLflow's standard variables (never logged)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    return {"auth": (user, password) if user and password else None,
            "headers": {"Authorization": f"Bearer {token}"} if token else {}, "verify": verify}


def server_up(uri: str, timeout: float = 3.0) -> bool:
    """Whether the tracking server answers its (unauthenticated) health check."""
    if not _is_http(uri):
        return True
    import requests

    try:
        r = requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=_request_kwargs()["verify"])
        return r.status_code == 200
    except requests.RequestException:
        return False


def check_tracking_server(uri: str | None = None, timeout: float = 4.0) -> None:
    """Fail fast, before any work, when a remote tracking server does not answer or refuses
    the credentials: MLflow's own client would retry for minutes first."""
    import mlflow
    import requests

    from .errors import ConfigError

    uri = uri or mlflow.get_tracking_uri()
    if not _is_http(uri):
        return
    shown = redact(uri)
    try:
        r = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                         timeout=timeout, **_request_kwargs())
    except requests.exceptions.SSLError as exc:
        raise ConfigError(f"tracking server {shown}: TLS failed ({type(exc).__name__}); set "
                          f"MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle") from None
    except requests.RequestException as exc:
        reason = ("timed out after %.0fs" % timeout if isinstance(exc, requests.Timeout)
                  else "connection refused" if "refused" in str(exc).lower() else type(exc).__name__)
        raise ConfigError(f"tracking server {shown} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI, "
                          f"or unset MLFLOW_TRACKING_URI to log to ./mlflow.db") from None
    if r.status_code == 401:
        raise ConfigError(f"tracking server {shown} refused the credentials (HTTP 401); set "
                          f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if r.status_code == 403:
        raise ConfigError(f"tracking server {shown} denied access (HTTP 403) to user "
                          f"{os.environ.get('MLFLOW_TRACKING_USERNAME', '')!r}; ask its admin for permissions")
    if r.status_code != 200:
        raise ConfigError(f"tracking server {shown} answered HTTP {r.status_code} to an MLflow API call; "
                          f"check that MLFLOW_TRACKING_URI points at an MLflow server")
    # Our own outage handling waits for the server; MLflow's exponential back-off (up to
    # ~4 min per call by default) would only hide an outage. Users' settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _say(message: str) -> None:
    print(f"[kd-mlflow] {message}", file=sys.stderr, flush=True)


def outage_wait_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("KD_TRACKING_OUTAGE_WAIT", "300")))
    except ValueError:
        return 300.0


class _Link:
    """This process's view of one tracking server: up, down since when, given up on."""

    _by_uri: dict = {}
    _registry_lock = threading.Lock()

    def __init__(self, uri: str):
        self.uri, self.shown = uri, redact(uri)
        self.down_since: float | None = None
        self.gave_up = False
        self._lock = threading.Lock()

    @classmethod
    def of(cls, uri: str) -> "_Link":
        with cls._registry_lock:
            return cls._by_uri.setdefault(uri, cls(uri))

    def up(self) -> bool:
        ok = server_up(self.uri)
        with self._lock:
            if ok and self.down_since is not None:
                _say(f"tracking server {self.shown} is back after {time.time() - self.down_since:.0f}s; "
                     f"delivering what was buffered")
                self.down_since, self.gave_up = None, False
            elif not ok and self.down_since is None:
                self.down_since = time.time()
                _say(f"warning: tracking server {self.shown} is unreachable; training goes on and metrics "
                     f"are buffered until it returns")
        return ok

    def wait(self, what: str) -> bool:
        """True once the server answers; False after KD_TRACKING_OUTAGE_WAIT seconds
        (waited once per outage: later calls give up at once)."""
        if self.up():
            return True
        if self.gave_up:
            return False
        wait = outage_wait_seconds()
        _say(f"waiting up to {wait:.0f}s (KD_TRACKING_OUTAGE_WAIT) for tracking server {self.shown} to log {what}")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(max(0.0, min(2.0, deadline - time.monotonic())))
            if self.up():
                return True
        self.gave_up = True
        _say(f"tracking server {self.shown} did not come back; what it missed goes to the run's "
             f"offline directory (upload it later with `kd-mlflow sync`)")
        return False

    def call(self, fn, what: str):
        """-> (True, fn()) once the server takes it, or (False, None) when it never came back.
        An error while the server is up is a real error and propagates."""
        while self.wait(what):
            try:
                return True, fn()
            except Exception:
                if self.up():
                    raise
        return False, None


OFFLINE_DIRS: list[Path] = []  # fallback directories written by this process


class _Offline:
    """What the tracking server missed for one run: ``runs/<run_id>/offline/`` with
    run.json (params, tags, artifacts, models, final status), metrics.jsonl and files/."""

    def __init__(self, run_id: str, link: _Link):
        self.dir = OFFLINE_ROOT / run_id / "offline"
        # A run created offline (created_offline) also has its run_name and start_time here;
        # run_id is then an id the server has never seen, and parent_run_id may be one too.
        self.record = {"format": "kd-mlflow-offline/1", "run_id": run_id, "tracking_uri": link.shown,
                       "experiment_name": None, "parent_run_id": None, "params": {}, "tags": {},
                       "artifacts": [], "datasets": [], "models": [], "registrations": [], "status": None,
                       "end_time": None,
                       "done": []}
        self.used = False
        self._lock = threading.Lock()

    def path_for(self, artifact_path: str) -> Path:
        target = self.dir / "files" / artifact_path
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add(self, key: str, value) -> None:
        with self._lock:
            self.used = True
            if isinstance(self.record[key], dict):
                self.record[key].update(value)
            elif isinstance(self.record[key], list):
                self.record[key].append(value)
            else:
                self.record[key] = value

    def add_file(self, artifact_path: str) -> None:
        self.add("artifacts", artifact_path)

    def add_metrics(self, metrics) -> None:
        if not metrics:
            return
        with self._lock:
            self.used = True
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "metrics.jsonl", "a") as f:
                for m in metrics:
                    f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp,
                                        "step": m.step}) + "\n")

    def save(self) -> Path | None:
        if not self.used:
            return None
        from .checkpoint import atomic_write_text

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.record, indent=2, default=str), self.dir / "run.json")
        if self.dir not in OFFLINE_DIRS:
            OFFLINE_DIRS.append(self.dir)
        return self.dir


def _as_metrics(metrics: dict, step: int | None) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()]


class _OfflineMetrics:
    """The metric buffer of a run created offline: its points go straight to the offline file."""

    def __init__(self, offline: _Offline):
        self.offline = offline

    def add(self, metrics: dict, step: int | None) -> None:
        self.offline.add_metrics(_as_metrics(metrics, step))

    def flush(self, timeout: float = 60.0) -> bool:
        return False

    def close(self) -> None:
        pass


class _MetricBuffer:
    """Metrics in logging order, delivered in batches by a daemon thread, so the epoch
    loop never waits on the server; an outage only delays them. Bounded: beyond
    MAX_BUFFERED_METRICS points the oldest go to the offline file (never dropped)."""

    def __init__(self, run_id: str, link: _Link, offline: _Offline):
        self.run_id, self.link, self.offline = run_id, link, offline
        self.pending: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name=f"kd-metrics-{run_id[:8]}", daemon=True)
        self.thread.start()

    def add(self, metrics: dict, step: int | None) -> None:
        with self.cond:
            self.pending.extend(_as_metrics(metrics, step))
            overflow = len(self.pending) - MAX_BUFFERED_METRICS
            if overflow > 0:
                self.offline.add_metrics([self.pending.popleft() for _ in range(overflow)])
            self.cond.notify_all()

    def _next_batch(self) -> list:
        return [self.pending[i] for i in range(min(1000, len(self.pending)))]

    def _deliver(self, batch) -> bool:
        if not self.link.up():
            return False
        try:
            import mlflow

            mlflow.MlflowClient().log_batch(self.run_id, metrics=batch, synchronous=True)
            return True
        except Exception as exc:
            if self.link.up():
                _say(f"warning: logging metrics to run {self.run_id} failed ({type(exc).__name__}: "
                     f"{redact((str(exc).splitlines() or [''])[0])[:200]}); retrying")
            return False

    def _done(self, batch) -> None:
        with self.cond:
            for _ in batch:
                self.pending.popleft()
            self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return  # close() delivers the rest on the caller's thread
                batch = self._next_batch()
            if self._deliver(batch):
                self._done(batch)
            else:
                with self.cond:
                    self.cond.wait(timeout=2.0)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every point added so far has been delivered; False if some are still
        pending after ``timeout`` seconds (the server is away: they stay buffered)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            return not self.pending

    def close(self) -> None:
        """Deliver what is left, waiting for an absent server (KD_TRACKING_OUTAGE_WAIT);
        what it never takes goes to the offline directory."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()
        failures = 0
        while self.pending and failures < 3:
            if not self.link.wait(f"{len(self.pending)} buffered metric values"):
                break
            batch = self._next_batch()
            if self._deliver(batch):
                self._done(batch)
            else:
                failures += 1
        if self.pending:
            self.offline.add_metrics(list(self.pending))
            self.pending.clear()


class MlflowTracker:
    _warming: threading.Thread | None = None

    def __init__(self, run_id: str, *, offline_only: bool = False):
        """``offline_only``: a run created offline (the server does not know ``run_id``):
        everything it logs goes to its offline directory, whether the server is back or not."""
        import mlflow

        self.run_id = run_id
        self.link = _Link.of(mlflow.get_tracking_uri())
        self.offline = _Offline(run_id, self.link)
        self.offline_only = offline_only
        self.metrics = (_OfflineMetrics(self.offline) if offline_only
                        else _MetricBuffer(run_id, self.link, self.offline))
        self._system = None
        if MlflowTracker._warming is None:
            MlflowTracker._warming = threading.Thread(target=_warm_model_logging, name="warm-log-model",
                                                      daemon=True)
            MlflowTracker._warming.start()

    def _client(self):
        import mlflow

        return mlflow.MlflowClient()

    def _reach(self, fn, what: str):
        """-> (True, fn()) once the server takes it; (False, None) when it never came back,
        and at once for a run created offline."""
        if self.offline_only:
            return False, None
        return self.link.call(fn, what)

    def _call(self, what: str, fn, fallback):
        done, value = self._reach(fn, what)
        if done:
            return value
        fallback()
        return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        params = {k: ("" if v is None else str(v)) for k, v in params.items()}
        self._call("params", lambda: self._client().log_batch(
            self.run_id, params=[Param(k, v) for k, v in params.items()], synchronous=True),
            lambda: self.offline.add("params", params))

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        tags = {k: str(v) for k, v in tags.items()}
        self._call("tags", lambda: self._client().log_batch(
            self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True),
            lambda: self.offline.add("tags", tags))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.add(metrics, step)  # returns at once; a daemon thread delivers

    def backfill(self, history: list) -> None:
        """Log the epochs of ``history`` (one metrics dict per epoch, as in a checkpoint)
        whose metrics the run lacks."""
        def logged_epochs():
            return {m.step for m in self._client().get_metric_history(self.run_id, "train_loss")}

        done, logged = self._reach(logged_epochs, "the metric history")
        for epoch, metrics in enumerate(history if done else []):
            if epoch not in logged:
                self.log_metrics(metrics, step=epoch)

    def _log_file(self, artifact_path: str, write, upload) -> None:
        def keep():
            write(self.offline.path_for(artifact_path))
            self.offline.add_file(artifact_path)

        self._call(artifact_path, upload, keep)

    def log_dict(self, obj, path: str) -> None:
        self._log_file(path, lambda target: target.write_text(json.dumps(obj, indent=2, default=str)),
                       lambda: self._client().log_dict(self.run_id, obj, path))

    def log_text(self, text: str, path: str) -> None:
        self._log_file(path, lambda target: target.write_text(text),
                       lambda: self._client().log_text(self.run_id, text, path))

    def log_figure(self, fig, path: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self._log_file(path, lambda target: fig.savefig(target),
                           lambda: self._client().log_figure(self.run_id, fig, path))
        finally:
            plt.close(fig)

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        name = Path(local_path).name
        self._log_file(f"{artifact_path}/{name}" if artifact_path else name,
                       lambda target: shutil.copyfile(local_path, target),
                       lambda: self._client().log_artifact(self.run_id, str(local_path), artifact_path))

    def log_datasets(self, datasets: list) -> None:
        """The run's Datasets (data.DataBundle.datasets): train, validation and test."""
        if datasets:
            self._call("the datasets", lambda: self._client().log_inputs(self.run_id, dataset_inputs(datasets)),
                       lambda: [self.offline.add("datasets", d) for d in datasets])

    def log_model(self, model, example, *, registered_name: str | None, checkpoint: Path | None = None,
                  name: str = "model", card: dict | None = None, raw_example=None):
        """Log ``model`` (an nn.Module, moved to CPU fp32) in MLflow's pickle-free pt2 format,
        with explicit requirements (inferring them costs ~30 s), plus the kd-mlflow
        checkpoint so the registered model can serve as a teacher.

        With a ``card`` (serving.model_card) and ``raw_example`` (uint8 images as the
        dataset stores them), the model explains itself: metadata, the image pyfunc
        (uint8 in, class names out) with its signature and example, attached to the run
        at the selected epoch (``card["step"]``, so its metrics are that epoch's and the
        final ones logged at that step), and, when registered, the version's description
        and tags. Returns (model_uri, registered version or None); (None, None) when the
        server never came back (checkpoint, examples and card then wait in the offline
        directory)."""
        def keep():
            import torch

            entry = {"name": name, "registered_name": registered_name or None, "card": card}
            if checkpoint is not None:
                shutil.copyfile(checkpoint, self.offline.path_for(f"_model/{name}/{Path(checkpoint).name}"))
                entry["checkpoint"] = f"_model/{name}/{Path(checkpoint).name}"
            torch.save(example.detach().cpu(), self.offline.path_for(f"_model/{name}/example.pt"))
            entry["example"] = f"_model/{name}/example.pt"
            if raw_example is not None:
                torch.save(torch.as_tensor(raw_example), self.offline.path_for(f"_model/{name}/raw_example.pt"))
                entry["raw_example"] = f"_model/{name}/raw_example.pt"
            self.offline.add("models", entry)

        result = self._call(f"the model {name!r}", lambda: self._log_model(model, example, registered_name,
                                                                          checkpoint, name, card, raw_example), keep)
        return result if result is not None else (None, None)

    def _log_model(self, model, example, registered_name, checkpoint, name, card=None, raw_example=None):
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        if MlflowTracker._warming is not None:
            MlflowTracker._warming.join()
        # Everything logged so far must be in the run: MLflow attaches the run's metrics at
        # the model's step to the logged model, and the champion alias is chosen by the
        # versions' test_acc.
        self.metrics.flush()
        model = model.eval()
        common = {"pip_requirements": pip_requirements(), "registered_model_name": registered_name or None,
                  "extra_files": [str(checkpoint)] if checkpoint else None}
        if card is not None and raw_example is not None:
            from mlflow.models import Model

            from . import serving

            info = Model.log(None, name=name, flavor=serving, flavor_name="pytorch", metadata=card["metadata"],
                             step=int(card.get("step", 0)), pytorch_model=model, example=example,
                             raw_example=np.asarray(raw_example, dtype=np.uint8),
                             raw_signature=serving.raw_signature(card), **common)
        else:  # an offline directory written before models carried a card
            with torch.no_grad():
                output = model(example)
            info = mlflow.pytorch.log_model(
                model, name=name, input_example=example.numpy(), signature=infer_signature(example.numpy(),
                                                                                             output.numpy()),
                serialization_format="pt2", **common)
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            from .registry import describe_version, update_champion

            describe_version(mlflow.MlflowClient(), registered_name, int(version), card)
            update_champion(mlflow.MlflowClient(), registered_name)
        return info.model_uri, (int(version) if version is not None else None)

    def register(self, model_uri: str | None, name: str, card: dict | None = None) -> int | None:
        """Register an already logged model (e.g. the best child of a sweep) under ``name``,
        described by ``card`` (serving.model_card of the run that logged it)."""
        from .registry import register_version

        def register():
            self.metrics.flush()  # as in _log_model: this run's test_acc first
            return register_version(None, model_uri, name, card)

        if model_uri is None:  # its run's model is itself waiting in an offline directory
            _say(f"warning: not registering {name}: the model was never uploaded; register it after "
                 f"`kd-mlflow sync` with `mlflow.register_model`")
            return None
        return self._call(f"the registration of {name}", register,
                          lambda: self.offline.add("registrations", {"model_uri": model_uri, "name": name,
                                                                     "card": card}))

    @contextlib.contextmanager
    def child(self, name: str, tags: dict | None = None):
        """A nested run under this one. Created explicitly with its parent id: under
        `mlflow run`, MLFLOW_RUN_ID is set, and a plain start_run(nested=True) would
        resume the parent itself instead of opening a child.

        When the server does not come back within the outage wait (or this run was itself
        created offline), the child is created offline: it trains and logs into its
        offline directory under a fresh id, and `kd-mlflow sync` creates it under its parent."""
        import mlflow
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        def create():
            client = mlflow.MlflowClient()
            experiment_id = client.get_run(self.run_id).info.experiment_id
            return client.create_run(experiment_id, run_name=name,
                                     tags={**(tags or {}), MLFLOW_PARENT_RUN_ID: self.run_id})

        done, created = self._reach(create, f"the nested run {name!r}")
        if done:
            mlflow.start_run(run_id=created.info.run_id, nested=True)
            child = MlflowTracker(created.info.run_id)
        else:
            child = MlflowTracker(uuid.uuid4().hex, offline_only=True)
            # The parent goes into the record, not the tags: it may be an offline id too,
            # which sync replaces by the run it became.
            child.offline.record.update(created_offline=True, run_name=name, start_time=int(time.time() * 1000))
            child.offline.add("tags", {k: str(v) for k, v in (tags or {}).items()})
            _say(f"tracking server {self.link.shown} is away: the nested run {name!r} starts offline as "
                 f"{child.run_id}; `kd-mlflow sync` creates it under run {self.run_id} when the server is back")
        child.offline.record.update(experiment_name=self.offline.record["experiment_name"],
                                    parent_run_id=self.run_id)
        with _lifecycle(child) as tracker:
            yield tracker

    def monitor_system(self, interval: float = SYSTEM_METRICS_INTERVAL) -> None:
        """MLflow's system metrics for this run (system/cpu_utilization_percentage,
        system/system_memory_usage_megabytes, disk, network, and system/gpu_* where pynvml
        sees a GPU), sampled every ``interval`` s until close(); a resumed run continues
        their steps. MLflow's monitor talks to the server itself: during an outage it stops
        (with MLflow's warning) and the training goes on."""
        if self.offline_only or self._system is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=True)
            self._system.start()
        except Exception as exc:  # psutil missing, a platform psutil cannot read, ...
            _say(f"warning: no system metrics for this run ({type(exc).__name__}: {redact(str(exc))[:160]}); "
                 f"pass -P system_metrics=false to silence this")
            self._system = None

    def close(self, status: str) -> Path | None:
        """Deliver the buffered metrics and end the active run (this one) with ``status``;
        if the server never came back, save the offline directory and return it."""
        import mlflow

        if self._system is not None:
            with contextlib.suppress(Exception):
                self._system.finish()
        self.metrics.close()

        def end():
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)  # pops the local run stack, then tells the server
            else:  # an earlier attempt popped it and then lost the server
                self._client().set_terminated(self.run_id, status)

        done, _ = self._reach(end, "the run status")
        if not done:
            self.offline.add("status", status)
            self.offline.add("end_time", int(time.time() * 1000))
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                with _no_http_retries(), contextlib.suppress(Exception):
                    mlflow.end_run(status=status)  # pops the local run stack; the server call fails fast
        saved = self.offline.save()
        if saved is not None:
            _say(f"run {self.run_id}: what the tracking server missed is in {saved}; upload it with "
                 f"`kd-mlflow sync {saved}` when the server is back")
        return saved


@contextlib.contextmanager
def _no_http_retries():
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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

    from .errors import ConfigError

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


def _same_value(logged: str, value) -> bool:
    if isinstance(value, bool):
        return logged.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(logged) == float(value)
        except ValueError:
            return False
    return logged.strip("'") == str(value)  # `mlflow run` logs an empty value as ''


def resumable_run(params: dict, resume: str, has_checkpoint) -> str:
    """The run id to continue: ``resume`` itself, or for 'auto' the latest unfinished run
    of the experiment with the same params whose checkpoint ``has_checkpoint(run_id)``.
    Raises ConfigError (before anything is logged) when there is none or settings differ."""
    import mlflow

    from .errors import ConfigError

    client = mlflow.MlflowClient()

    def differences(run) -> list[str]:
        return [f"{k}: {run.data.params.get(k)!r} -> {v!r}" for k, v in params.items()
                if k in run.data.params and not _same_value(run.data.params[k], v)]

    if resume == "auto":
        _select_experiment(params.get("experiment", ""))
        exp_id = mlflow.tracking.fluent._get_experiment_id()
        runs = client.search_runs([exp_id], filter_string="attributes.status != 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=200)
        for run in runs:
            if run.data.params.get("mode") == params["mode"] and not differences(run) and has_checkpoint(run.info.run_id):
                return run.info.run_id
        raise ConfigError("resume=auto found no unfinished run with the same settings and a checkpoint in "
                          "./runs; start a new run (drop -P resume) or pass the run id")
    try:
        run = client.get_run(resume)
    except Exception:
        raise ConfigError(f"cannot resume: no run {resume!r} in the tracking store "
                          f"{shown_tracking_uri()}; check the run id (and MLFLOW_TRACKING_URI)") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {resume} already FINISHED; there is nothing to resume")
    diff = differences(run)
    if diff:
        raise ConfigError(f"run {resume} was made with other settings ({'; '.join(diff[:4])}); "
                          f"resume with the parameters it was started with")
    if not has_checkpoint(resume):
        raise ConfigError(f"run {resume} has no epoch checkpoint in ./runs/{resume}/last.pt; resume from the "
                          f"directory the run was started in (it finished no epoch if the file never existed)")
    return resume


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


@contextlib.contextmanager
def _lifecycle(tracker: MlflowTracker):
    """End the active run (the one ``tracker`` logs to) with the status its body earned:
    FINISHED; KILLED on Ctrl-C/SIGTERM/sys.exit(!=0); FAILED on any other exception,
    with the traceback logged as ``error/traceback.txt``. Never left RUNNING (unless the
    tracking server is gone; then the status waits in the offline directory)."""
    import traceback

    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, SystemExit) and exc.code not in (0, None) else "FAILED"
        with contextlib.suppress(Exception):
            tracker.log_text(redact(traceback.format_exc()), "error/traceback.txt")  # readable by all the server's users
        raise
    finally:
        tracker.close(status)
