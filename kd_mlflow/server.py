"""`kd-mlflow server`: a team tracking server, i.e. `mlflow server` with a PostgreSQL
backend store and proxied artifacts, started only after the things that otherwise fail
late and obscurely (a missing driver, an unreachable database, bad credentials, a taken
port, an unwritable artifact directory) have been checked, each with a one-line
"problem; fix" error.

Only the standard library is imported at module level: `kd-mlflow --help` stays fast,
and the driver is imported when it is checked.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

# These two import only the standard library, like this module.
from .config import BACKEND_ENV, unwritable_reason
from .tracking import redact

CONNECT_TIMEOUT_S = 10
SETUP_HINT = "`sudo make postgres` creates the role and database on Debian (see docs/operations.md, Team tracking server)"


class ServerError(Exception):
    """A problem the user can fix; str() is one line: the problem, then the fix."""


def postgres_driver(uri: str) -> str | None:
    """The DBAPI module SQLAlchemy (and so MLflow) will use for a PostgreSQL URI, else None.
    Without an explicit +driver this is SQLAlchemy's default: psycopg (3) from SQLAlchemy 2.1
    on, psycopg2 before."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    dialect, _, driver = scheme.partition("+")
    if dialect != "postgresql":
        return None
    if not driver:
        try:
            from sqlalchemy.engine import make_url

            driver = make_url(uri).get_dialect().driver
        except Exception:  # noqa: BLE001 - a malformed URI is reported by the connection check
            driver = "psycopg2"
    return driver


PIP_PACKAGE = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}


def connect_postgres(uri: str, timeout: float = CONNECT_TIMEOUT_S):
    """A DBAPI connection through the driver SQLAlchemy would use (psycopg or psycopg2)."""
    import importlib

    module = importlib.import_module(postgres_driver(uri) or "psycopg")
    return module.connect(libpq_uri(uri), connect_timeout=max(1, int(timeout)))


def libpq_uri(uri: str) -> str:
    """SQLAlchemy's postgresql+driver:// URI as libpq reads it (postgresql://)."""
    return "postgresql://" + uri.split("://", 1)[1]


def _reason(exc: Exception) -> str:
    lines = [redact(line.strip()) for line in str(exc).splitlines() if line.strip()]  # libpq may echo the URI
    text = " ".join(lines[0].split()) if lines else ""  # libpq adds hint lines: keep the message
    return re.sub(r"\bFATAL:\s*", "", text) or type(exc).__name__


def _fix_for(reason: str) -> str:
    low = reason.lower()
    if "password authentication failed" in low or "no password supplied" in low or (
            "role" in low and "does not exist" in low):
        return ("check the user and password: put the password in ~/.pgpass (mode 600), PGPASSWORD or the URI; "
                + SETUP_HINT)
    if "database" in low and "does not exist" in low:
        return ("create the database (`createdb -O USER NAME` as the postgres user) or fix its name in the URI; "
                + SETUP_HINT)
    if any(text in low for text in ("connection refused", "timeout", "could not translate host name",
                                    "resolve host", "no route to host", "did not answer")):
        return ("start PostgreSQL (Debian: `sudo make postgres`, or `pg_ctlcluster <version> main start`) "
                "or correct the host and port in --backend-store-uri / $" + BACKEND_ENV)
    return "check --backend-store-uri / $" + BACKEND_ENV + " (postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE)"


def check_postgres(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Connect once (bounded by ``timeout`` seconds overall, name resolution included) and
    raise ServerError naming the problem and the fix if the driver is missing or the
    database cannot be used."""
    driver = postgres_driver(uri)
    if driver is None:
        return
    try:
        module = __import__(driver)
    except ImportError:
        raise ServerError(f"the PostgreSQL driver {driver} (SQLAlchemy's for {uri.split('://')[0]}:// URIs) is not "
                          f"installed; install it with `pip install 'kd-mlflow[server]'` "
                          f"(or `pip install '{PIP_PACKAGE.get(driver, driver)}'`)") from None
    if driver not in PIP_PACKAGE:
        return  # other drivers: MLflow reports connection problems itself

    outcome: dict = {}

    def connect():
        try:
            connect_postgres(uri, timeout).close()
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below, in one line
            outcome["error"] = exc

    # libpq's connect_timeout is per address and does not cover name resolution: bound it all.
    worker = threading.Thread(target=connect, daemon=True, name="postgres-check")
    worker.start()
    worker.join(timeout + 2)
    if "ok" in outcome:
        return
    error = outcome.get("error")
    if error is None:
        reason = f"did not answer within {timeout:.0f} s"
    elif isinstance(error, module.ProgrammingError):  # a malformed URI
        raise ServerError(f"invalid PostgreSQL URI {redact(uri)}: {_reason(error)}; expected "
                          f"postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE")
    else:
        reason = _reason(error)
    raise ServerError(f"cannot connect to PostgreSQL at {redact(uri)}: {reason}; {_fix_for(reason)}")


def check_port(host: str, port: int) -> None:
    """Bind (host, port) the way uvicorn will (SO_REUSEADDR) and release it at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on host {host!r}: {exc.strerror}; use 127.0.0.1 (default), 0.0.0.0 "
                          f"or an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} on {host} is already in use; stop what listens there "
                                  f"(`ss -ltnp 'sport = :{port}'` shows it) or choose another with --port") from None
            if exc.errno == errno.EACCES:
                raise ServerError(f"no permission to listen on port {port}; choose --port 1024 or above") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ServerError(f"{host} is not an address of this machine; use 127.0.0.1 (default), 0.0.0.0 "
                                  f"or one of this machine's addresses with --host") from None
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --host/--port") from None


def resolve_artifacts(destination: str) -> str:
    """A local destination becomes an absolute, existing directory; a remote one is
    checked for the client library MLflow will need."""
    scheme = destination.split("://", 1)[0].lower() if "://" in destination else ""
    if scheme in ("s3",):
        try:
            __import__("boto3")
        except ImportError:
            raise ServerError(f"the artifact store {destination} needs boto3; install it with `pip install boto3` "
                              f"(and set MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from None
        return destination
    if scheme and scheme != "file":
        return destination
    path = Path(urllib.parse.urlsplit(destination).path if scheme == "file" else destination).expanduser().resolve()
    reason = unwritable_reason(path)
    if reason:
        raise ServerError(f"cannot write artifacts to {path}: {reason}; choose a writable --artifacts-destination")
    return str(path)


def _http_url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"  # IPv6 literals in brackets


def public_url(host: str, port: int) -> str:
    """The URL clients use: loopback stays 127.0.0.1, a wildcard bind names this machine."""
    return _http_url(socket.getfqdn() if host in ("0.0.0.0", "::", "") else host, port)


def _local_url(host: str, port: int) -> str:
    return _http_url({"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host), port)


def is_loopback(host: str) -> bool:
    try:
        return all(_is_loopback_address(info[4][0]) for info in socket.getaddrinfo(host, None))
    except socket.gaierror:
        return False


def _is_loopback_address(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the server if kd-mlflow itself is killed (SIGKILL included), so a
    lost parent never leaves an orphaned server holding the port."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def mlflow_command() -> list[str]:
    script = Path(sys.executable).parent / "mlflow"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mlflow"]


def serve(backend_store_uri: str, artifacts_destination: str, host: str, port: int, workers: int,
          mlflow_args=(), echo=print, ready_timeout: float = 300.0) -> int:
    """Check, then run `mlflow server` in the foreground until it exits or is signalled.
    Returns the exit code for kd-mlflow. Raises ServerError before starting anything."""
    if postgres_driver(backend_store_uri) is None and backend_store_uri.split(":", 1)[0].lower() == "postgres":
        raise ServerError(f"{redact(backend_store_uri)}: SQLAlchemy does not accept postgres://; "
                          f"write postgresql://")
    check_port(host, port)
    started = time.monotonic()
    check_postgres(backend_store_uri)
    destination = resolve_artifacts(artifacts_destination)
    if postgres_driver(backend_store_uri):
        echo(f"PostgreSQL at {redact(backend_store_uri)}: reachable ({time.monotonic() - started:.1f} s)")
    echo(f"artifacts: proxied by the server to {destination}")

    # The backend URI travels in the environment, not argv, so a password in it never
    # shows in `ps` (mlflow server reads MLFLOW_BACKEND_STORE_URI).
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store_uri}
    # MLflow's job runner serves GenAI features (judges, online scoring) that experiment
    # tracking does not use; it costs 8 extra processes (~1 GB RSS) and slows every start
    # on a small machine. Off unless the environment asks for it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [*mlflow_command(), "server", "--artifacts-destination", destination, "--host", host,
           "--port", str(port), "--workers", str(workers), *mlflow_args]
    # Own session: a terminal's Ctrl-C reaches kd-mlflow only, which forwards exactly one
    # signal (a second SIGINT makes uvicorn skip its graceful shutdown).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    stopping: list[int] = []

    def forward(signum, _frame):
        stopping.append(signum)
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        url = public_url(host, port)
        if _wait_healthy(_local_url(host, port) + "/health", proc, ready_timeout, stopping):
            echo(f"\ntracking server ready at {url}  (Ctrl-C or SIGTERM stops it and its workers)")
            echo(f"  export MLFLOW_TRACKING_URI={url}")
            if is_loopback(host):
                echo(f"  listening on {host} only: other machines cannot reach it; --host exposes it "
                     f"(behind authentication: see docs/operations.md, Team tracking server)")
            else:
                echo(f"  WARNING: listening on {host}: whoever reaches this port can read and change every run "
                     f"and model; put an authenticating reverse proxy in front or add `-- --app-name basic-auth`")
        code = _wait(proc)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception of ours, not the server's exit
            proc.terminate()
            _wait(proc)
        # With job execution on, MLflow's job runner starts Huey consumers that notice their
        # parent is gone only once their (slow) imports finish: a server stopped soon after
        # it started would leave them running. They share the session we gave the server,
        # so end that whole.
        stop_process_group(proc.pid)
    if stopping:
        echo(f"tracking server stopped ({signal.Signals(stopping[0]).name})")
        return 0
    if code != 0:
        print(f"error: mlflow server exited with code {code}; its output above says why", file=sys.stderr)
    return code


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; Linux reads /proc, elsewhere killpg(0)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except OSError:
            return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
                members.append(int(entry))
    return members


def stop_process_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM what is left of the server's process group, SIGKILL it after ``grace`` s."""
    if not _group_members(pgid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_members(pgid):
                return
            time.sleep(0.2)


def _wait(proc: subprocess.Popen) -> int:
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # pragma: no cover - only if a handler was bypassed
            continue


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, stopping: list) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not stopping:
        try:
            with _DIRECT.open(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False
