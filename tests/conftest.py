"""Shared fixtures: a real `mlflow server` subprocess and helpers to drive `mlflow run`.

Nothing here is mocked: the server is MLflow's own, on a free 127.0.0.1 port, with a
SQLite backend (or the URI in KD_TEST_BACKEND_STORE_URI, or with KD_TEST_BACKEND=postgres
a fresh PostgreSQL database, see below) and a proxied artifact store in a temporary
directory; the data is the real Fashion-MNIST.

PostgreSQL: KD_TEST_POSTGRES_URI names a role that may CREATE DATABASE (`make postgres`
prints it); each use creates a uniquely named database and drops it afterwards, so runs
never collide. Without it, PostgreSQL tests skip with the reason; KD_REQUIRE_POSTGRES=1
(CI) turns that skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def share_cores_among_xdist_workers() -> set[int] | None:
    """Under pytest-xdist, pin this worker (and so every process it starts: servers,
    `mlflow run`, ranks, Ray) to its own share of the CPUs. A run's default `threads` is
    the cores its process may use, so two workers that train at once no longer run two
    threads each on the same two cores, where OpenMP's waiting threads spin against each
    other (10-20x slower than one training alone). -> the CPUs kept, or None (not a worker,
    no affinity on this OS, or fewer CPUs than workers)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and count.isdigit()) or not hasattr(os, "sched_setaffinity"):
        return None
    cpus, index, workers = sorted(os.sched_getaffinity(0)), int(worker[2:]), int(count)
    if len(cpus) < workers:
        return None
    share = set(cpus[index % workers::workers])
    try:
        os.sched_setaffinity(0, share)
    except OSError:  # a container that forbids it: the workers share the CPUs, as before
        return None
    return share


# before torch is imported here: its thread pool is sized by the CPUs this process may use
XDIST_CPUS = share_cores_among_xdist_workers()

# Small enough for 2 CPU cores, large enough that accuracies are not noise.
TINY = {"train_subset": 1000, "val_size": 500, "test_subset": 1000, "batch_size": 100,
        "epochs": 2, "device": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


_SQLITE_TEMPLATE: list[Path] = []


def sqlite_store(directory: Path, name: str = "mlflow.db", artifact_root: str | None = None) -> str:
    """-> the URI of the SQLite tracking store ``directory/name``. A store that does not
    exist yet starts as a copy of one this process migrated once: MLflow's migrations cost
    ~3 s per new store, a copy milliseconds, and a test that creates many stores (each
    training subprocess its own) would otherwise pay them every time. The copy's Default
    experiment gets the artifact location MLflow would give it there (``artifact_root``,
    else ``directory/mlruns``, plus /0). For stores whose creation a test is about (a
    command that must not open the store), use the plain URI instead."""
    import atexit
    import shutil
    import sqlite3
    import tempfile

    target = Path(directory) / name
    if not target.exists():
        if not _SQLITE_TEMPLATE:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            template = Path(tempfile.mkdtemp(prefix="kd-test-sqlite-")) / "template.db"
            atexit.register(shutil.rmtree, template.parent, True)
            SqlAlchemyStore(f"sqlite:///{template}", str(template.parent / "mlruns")).engine.dispose()
            _SQLITE_TEMPLATE.append(template)
        shutil.copyfile(_SQLITE_TEMPLATE[0], target)
        root = artifact_root or str(Path(directory).resolve() / "mlruns")
        with contextlib.closing(sqlite3.connect(target)) as db, db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (root.rstrip("/") + "/0",))
    return f"sqlite:///{target}"


def start_mlflow_server(workdir: Path, backend_uri: str | None = None, extra_args=(), env=None,
                        port: int | None = None):
    """-> (process, url). A given ``port`` restarts a stopped server where clients expect it;
    the log is appended to, so a restart keeps the first life's lines."""
    port = port or free_port()
    backend = backend_uri or sqlite_store(workdir, artifact_root="mlflow-artifacts:/")
    log = open(workdir / "server.log", "ab")
    # MLflow's GenAI job runner (8 processes with its Huey consumers, ~1 GB) is of no use to these tests
    # and slows every server start on 2 cores; kd-mlflow server turns it off the same way.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(os.environ if env is None else env)}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend, "--artifacts-destination", str(workdir / "artifacts"),
         *extra_args],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc=proc)
    except Exception:
        stop_server(proc)
        raise RuntimeError((workdir / "server.log").read_text()[-3000:])
    return proc, url


def listening_sockets() -> list[tuple[str, int, str]]:
    """(address, port, inode) of every LISTEN TCP socket, from /proc/net/tcp{,6} (Linux)."""
    import ipaddress

    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # 0A = LISTEN
                continue
            address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) byte order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((str(ipaddress.ip_address(raw)), int(hex_port, 16), fields[9]))
    return found


def process_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state, session id) for every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid, _, sid = stat.rsplit(")", 1)[1].split()[:4]
            table[int(entry.name)] = (int(ppid), state, int(sid))
    return table


def descendants(pid: int) -> set[int]:
    """The pids of the children of ``pid``, their children, ... (Linux /proc)."""
    table = process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (parent, _, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def stop_server(proc: subprocess.Popen) -> None:
    # `mlflow server` forwards SIGTERM to its workers, so its own pid is enough.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def postgres_problem() -> str | None:
    """Why the tests cannot use PostgreSQL, or None when KD_TEST_POSTGRES_URI answers."""
    uri = os.environ.get("KD_TEST_POSTGRES_URI", "")
    if not uri:
        return "KD_TEST_POSTGRES_URI is not set (see docs/testing.md)"
    from kd_mlflow.server import ServerError, check_postgres

    try:
        check_postgres(uri)
    except ServerError as exc:
        return str(exc)
    return None


def require_postgres() -> str:
    """KD_TEST_POSTGRES_URI, or skip (fail under KD_REQUIRE_POSTGRES=1) saying why not."""
    problem = postgres_problem()
    if problem:
        if os.environ.get("KD_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"KD_REQUIRE_POSTGRES=1 but PostgreSQL is not usable: {problem}", pytrace=False)
        pytest.skip(f"PostgreSQL not available: {problem}")
    return os.environ["KD_TEST_POSTGRES_URI"]


def _postgres_admin(uri: str, sql: str) -> None:
    from kd_mlflow.server import connect_postgres

    conn = connect_postgres(uri)
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextmanager
def fresh_postgres_database(prefix: str = "kd_test"):
    """A new, empty database next to KD_TEST_POSTGRES_URI's; yields its URI, drops it after."""
    import urllib.parse

    admin = require_postgres()
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _postgres_admin(admin, f'CREATE DATABASE "{name}"')
    try:
        yield urllib.parse.urlunsplit(urllib.parse.urlsplit(admin)._replace(path="/" + name))
    finally:
        _postgres_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow-server")
    with ExitStack() as stack:
        backend = os.environ.get("KD_TEST_BACKEND_STORE_URI")
        if not backend and os.environ.get("KD_TEST_BACKEND") == "postgres":
            backend = stack.enter_context(fresh_postgres_database())
        proc, url = start_mlflow_server(workdir, backend)
        yield url
        stop_server(proc)  # before the database is dropped


@pytest.fixture(autouse=True)
def no_inherited_mlflow_run_or_experiment():
    """mlflow.set_experiment and mlflow run's launcher put MLFLOW_EXPERIMENT_ID (and the
    others) into os.environ; one left there by an earlier test in the same process points
    the next test at an experiment of another store ("No Experiment with id=3 exists"),
    depending on which tests a pytest-xdist worker ran before."""
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    yield


@pytest.fixture()
def own_tracking_uri():
    """-> a setter for MLflow's process-wide tracking URI that is undone after the test
    (mlflow.set_tracking_uri left set leaks into later tests: a later MlflowClient() would
    log to a store that is gone)."""
    import mlflow

    yield mlflow.set_tracking_uri
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def tracking(mlflow_server, monkeypatch):
    """Point this process at the test server and give the test its own experiment."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


# Metrics that measure how fast a run went or what the teacher cache saved, not what it
# learned: left out when runs of one cell are compared bit for bit.
TIMINGS = {"epoch_seconds", "images_per_second", "startup_seconds", "teacher_forwards_computed",
           "teacher_forwards_reused"}


def cli_options(values: dict) -> list[str]:
    """{"train_subset": 256} -> ["--train-subset=256"]."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def learned_metrics(client, run) -> dict:
    """Every metric ``run`` logged but TIMINGS and system metrics, as [(step, value)]."""
    return {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name),
                                                       key=lambda m: m.step)]
            for name in sorted(set(run.data.metrics) - TIMINGS) if not name.startswith("system/")}


def unique_experiment(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def mlflow_run(entry: str, server: str, experiment: str, params: dict, check: bool = True, env: dict | None = None):
    """`mlflow run . -e ENTRY --env-manager local` from the repo root, against ``server``
    (``env``: more environment variables)."""
    cmd = [str(BIN / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    # The experiment is the one named above: an MLFLOW_EXPERIMENT_ID that an in-process test's
    # mlflow.set_experiment left in os.environ would make `mlflow run` refuse both options.
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env = {**inherited, "MLFLOW_TRACKING_URI": server, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def runs_of(server: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(server)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="session")
def teacher_run(mlflow_server, tmp_path_factory):
    """A resnet8 teacher trained through `mlflow run . -e teacher` (shared by the e2e tests)."""
    out = tmp_path_factory.mktemp("teacher") / "fmnist-resnet8.pt"
    experiment = unique_experiment("teacher")
    proc = mlflow_run("teacher", mlflow_server, experiment,
                      {**TINY, "arch": "resnet8", "output": out, "epochs": 2, "train_subset": 2000,
                       "registered_model": "fashion_mnist-resnet8-teacher"})  # a smoke run: named to register
    return {"checkpoint": out, "experiment": experiment, "proc": proc}
