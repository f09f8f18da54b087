"""Shared fixtures: a real `mlflow server` subprocess and helpers to drive `mlflow run`.

Nothing here is mocked: the server is MLflow's own, on a free 127.0.0.1 port, with a
SQLite backend (or the URI in KD_TEST_BACKEND_STORE_URI, e.g. PostgreSQL) and a
proxied artifact store in a temporary directory; the data is the real Fashion-MNIST.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

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


def start_mlflow_server(workdir: Path, backend_uri: str | None = None, extra_args=(), env=None):
    port = free_port()
    backend = backend_uri or f"sqlite:///{workdir}/mlflow.db"
    log = open(workdir / "server.log", "wb")
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


def stop_server(proc: subprocess.Popen) -> None:
    # `mlflow server` forwards SIGTERM to its workers, so its own pid is enough.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow-server")
    proc, url = start_mlflow_server(workdir, os.environ.get("KD_TEST_BACKEND_STORE_URI"))
    yield url
    stop_server(proc)


@pytest.fixture()
def tracking(mlflow_server, monkeypatch):
    """Point this process at the test server and give the test its own experiment."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


def unique_experiment(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def mlflow_run(entry: str, server: str, experiment: str, params: dict, check: bool = True):
    """`mlflow run . -e ENTRY --env-manager local` from the repo root, against ``server``."""
    cmd = [str(BIN / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PATH": f"{BIN}:{os.environ['PATH']}"}
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
                      {**TINY, "arch": "resnet8", "output": out, "epochs": 2, "train_subset": 2000})
    return {"checkpoint": out, "experiment": experiment, "proc": proc}
