"""Tracking-server outages and a shared, password-protected server. Real processes only:
a real `mlflow server` (stopped with SIGTERM and restarted on the same port and store
mid-run), a real `kd-mlflow train` subprocess, real Fashion-MNIST.

- unreachable at start: a one-line error naming the URI within seconds, nothing trained;
- down mid-run and back: training goes on, metrics are buffered and delivered, the run
  ends FINISHED with every epoch and the model;
- down for good: the training finishes, everything the server missed is written to
  runs/<id>/offline, exit 75; `kd-mlflow sync` uploads it later, once;
- basic-auth server: credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD, a wrong
  password is a clear error, and the password appears nowhere in what was logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, start_mlflow_server, stop_server

pytestmark = pytest.mark.e2e

ARGS = ["--train-subset", "400", "--val-size", "200", "--test-subset", "300", "--batch-size", "100",
        "--device", "cpu"]


class Server:
    """conftest's `mlflow server` on a fixed 127.0.0.1 port, so it can be stopped and restarted."""

    def __init__(self, workdir: Path, extra=(), env=None):
        self.workdir, self.extra, self.env = workdir, list(extra), env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        self.proc, _ = start_mlflow_server(self.workdir, extra_args=self.extra, env=self.env, port=self.port)
        return self

    def stop(self):
        stop_server(self.proc)


class Training:
    """`kd-mlflow train MODE` in the background, its stderr read line by line."""

    def __init__(self, cwd: Path, url: str, mode: str, *args, env_extra=None):
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO), **(env_extra or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "kd_mlflow", "train", mode, *ARGS, *args], cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"training exited before printing {text!r}:\n{''.join(self.stderr)[-3000:]}")
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout}s:\n{''.join(self.stderr)[-3000:]}")

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        return self.proc.returncode, out, "".join(self.stderr)


def _the_run(url: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_unreachable_server_is_a_clear_error_within_seconds(tmp_path):
    url = f"http://someone:hunter2secret@127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kd_mlflow", "train", "kd", *ARGS, "--epochs", "1"], cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert "is unreachable (connection refused)" in error and "MLFLOW_TRACKING_URI" in error, error
    assert f"http://someone:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in error  # names the URI, not the password
    assert "hunter2secret" not in proc.stderr + proc.stdout
    # Behaviour, not speed: it must fail at once instead of retrying for minutes.
    assert elapsed < 30, elapsed
    assert not (tmp_path / "runs").exists(), "nothing may be trained or written"


@contextlib.contextmanager
def server_stopped_after_first_epoch(tmp_path, experiment: str, epochs: int, outage_wait: int):
    """A nokd training against a real server that is stopped once the first epoch is logged."""
    server = Server(tmp_path).start()
    train = Training(tmp_path, server.url, "nokd", "--epochs", str(epochs), "--experiment", experiment,
                     env_extra={"KD_TRACKING_OUTAGE_WAIT": str(outage_wait)})
    try:
        train.wait_for(f"epoch 1/{epochs}")
        server.stop()
        yield server, train
    finally:
        train.proc.kill()
        server.stop()


def test_server_down_mid_run_buffers_metrics_and_delivers_them_when_it_returns(tmp_path):
    experiment = "outage-back"
    with server_stopped_after_first_epoch(tmp_path, experiment, 6, outage_wait=120) as (server, train):
        train.wait_for("epoch 3/6")  # two epochs trained while the server was away
        server.start()
        rc, out, err = train.finish()
        assert rc == 0, err[-3000:]
        assert "is unreachable; training goes on" in err and "is back after" in err, err[-3000:]
        client, run = _the_run(server.url, experiment)
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_acc", "epoch_seconds"):
            assert _steps(client, run.info.run_id, key) == list(range(6)), key
        assert "test_acc" in run.data.metrics
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "figures"} <= logged
        versions = client.search_model_versions(f"name='fashion_mnist-resnet8-nokd'")
        assert [v.run_id for v in versions] == [run.info.run_id]
        assert not (tmp_path / "runs" / run.info.run_id / "offline").exists()


def test_server_gone_for_good_writes_offline_dir_that_sync_uploads_once(tmp_path):
    experiment = "outage-gone"
    with server_stopped_after_first_epoch(tmp_path, experiment, 3, outage_wait=3) as (server, train):
        rc, out, err = train.finish()
        assert rc == 75, err[-3000:]
        assert "did not come back" in err and "kd-mlflow sync" in err, err[-3000:]
        [offline] = list((tmp_path / "runs").glob("*/offline"))
        record = json.loads((offline / "run.json").read_text())
        run_id = record["run_id"]
        assert record["status"] == "FINISHED"
        assert [m["registered_name"] for m in record["models"]] == ["fashion_mnist-resnet8-nokd"]
        assert "config.json" in record["artifacts"] and "figures/learning_curves.png" in record["artifacts"]
        waiting = [json.loads(line) for line in (offline / "metrics.jsonl").read_text().splitlines()]
        assert {"test_acc", "train_loss"} <= {m["key"] for m in waiting}

        server.start()
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(REPO)}
        sync = subprocess.run([sys.executable, "-m", "kd_mlflow", "sync", "runs"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stderr[-3000:]
        client, run = _the_run(server.url, experiment)
        assert run.info.run_id == run_id and run.info.status == "FINISHED"
        assert _steps(client, run_id, "train_loss") == [0, 1, 2]
        assert "test_acc" in run.data.metrics
        assert {"config.json", "figures"} <= {a.path for a in client.list_artifacts(run_id)}
        [version] = client.search_model_versions("name='fashion_mnist-resnet8-nokd'")
        assert version.run_id == run_id

        again = subprocess.run([sys.executable, "-m", "kd_mlflow", "sync", "runs"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
        assert _steps(client, run_id, "train_loss") == [0, 1, 2]  # nothing uploaded twice
        assert len(client.search_model_versions("name='fashion_mnist-resnet8-nokd'")) == 1


def test_basic_auth_server_credentials_come_from_env_and_are_never_logged(tmp_path, monkeypatch):
    password = "pw-" + secrets.token_hex(12)
    ini = tmp_path / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path}/auth.db\n"
                   f"admin_username = admin\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = Server(tmp_path, ["--app-name", "basic-auth"],
                    env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                         "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}).start()
    try:
        work = tmp_path / "work"
        work.mkdir()
        base = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(REPO),
                "MLFLOW_TRACKING_USERNAME": "admin"}
        cmd = [sys.executable, "-m", "kd_mlflow", "train", "nokd", *ARGS, "--epochs", "1", "--experiment", "auth"]

        wrong = subprocess.run(cmd, cwd=work, env={**base, "MLFLOW_TRACKING_PASSWORD": "not-it"},
                               capture_output=True, text=True, timeout=120)
        assert wrong.returncode == 2
        assert "refused the credentials (HTTP 401)" in wrong.stderr and "MLFLOW_TRACKING_PASSWORD" in wrong.stderr
        assert not (work / "runs").exists()

        ok = subprocess.run(cmd, cwd=work, env={**base, "MLFLOW_TRACKING_PASSWORD": password},
                            capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert password not in ok.stdout + ok.stderr

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        import mlflow

        mlflow.set_tracking_uri(server.url)

        client, run = _the_run(server.url, "auth")
        assert run.info.status == "FINISHED"
        logged_text = json.dumps({"params": run.data.params, "tags": run.data.tags,
                                  "metrics": list(run.data.metrics)})
        assert password not in logged_text
        downloaded = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl"),
                                                              tracking_uri=server.url))
        [version] = client.search_model_versions("name='fashion_mnist-resnet8-nokd'")
        model_dir = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "model"),
                                                             tracking_uri=server.url))
        files = [p for root in (downloaded, model_dir, work, tmp_path / "artifacts") for p in root.rglob("*")
                 if p.is_file()]
        assert len(files) > 5
        files.append(tmp_path / "mlflow.db")  # the server's own store of params, tags and metrics
        leaked = [str(p) for p in files if password.encode() in p.read_bytes()]
        assert leaked == []
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)
        server.stop()
