"""Server health, credentials and what people may see of a server: the fail-fast check
before a run starts, the health probe and the outage wait (``_Link``), and ``redact``,
the one place that renders a server URI for people (passwords masked)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from ..errors import ConfigError


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


def worker_environment() -> dict:
    """What a worker on another process or node needs to reach this tracking store: the
    URI (a relative SQLite path made absolute) and MLflow's credential variables. Passed
    to the worker's task, never logged or shown."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    env = {"MLFLOW_TRACKING_URI": uri}
    registry = mlflow.get_registry_uri()
    if registry and registry != mlflow.get_tracking_uri():
        env["MLFLOW_REGISTRY_URI"] = registry
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_EXPERIMENT_NAME",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "KD_TRACKING_OUTAGE_WAIT"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


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
