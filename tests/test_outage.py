"""Tracking-server outages and a shared, password-protected server. Real processes only:
a real `mlflow server` (stopped with SIGTERM and restarted on the same port and store
mid-run), a real `kd-mlflow train` subprocess, real Fashion-MNIST.

- unreachable at start: a one-line error naming the URI within seconds, nothing trained;
- down mid-run and back: training goes on, metrics are buffered and delivered, the run
  ends FINISHED with every epoch and the model;
- down for good: the training finishes, everything the server missed is written to
  runs/<id>/offline, exit 75; `kd-mlflow sync` uploads it later, once;
- down when a sweep opens its next stage: the nested run is created offline and trains;
  `kd-mlflow sync` creates it under its parent;
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

from conftest import REPO, free_port, sqlite_store, start_mlflow_server, stop_server

pytestmark = pytest.mark.e2e

ARGS = ["--train-subset", "400", "--val-size", "200", "--test-subset", "300", "--batch-size", "100",
        "--device", "cpu", "--registered-model", "fashion_mnist-resnet8-nokd"]  # a smoke run registers when named


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
    """`kd-mlflow train MODE` in the background, its stderr read line by line (``launcher``:
    how Python starts kd-mlflow, by default ``-m kd_mlflow``)."""

    def __init__(self, cwd: Path, url: str, mode: str, *args, env_extra=None, launcher=("-m", "kd_mlflow")):
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO), **(env_extra or {})}
        self.proc = subprocess.Popen([sys.executable, *launcher, "train", mode, *ARGS, *args], cwd=cwd,
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


def test_mlflow_run_against_a_closed_port_fails_fast_with_the_readme_settings(tmp_path):
    """`mlflow run` creates its run before any kd-mlflow code runs, so against a server that
    is down it is MLflow's launcher that retries (about 4 minutes at MLflow's defaults). With
    the settings docs/operations.md gives, it gives up at once; credentials passed as docs/operations.md
    says (environment, not the URI) appear nowhere in what it prints."""
    password = secrets.token_hex(8)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # nothing listens there
           "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": password,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    start = time.monotonic()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "mlflow"), "run", str(REPO), "-e", "kd", "--env-manager",
                           "local", "-P", "epochs=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "Connection refused" in proc.stderr, proc.stderr[-2000:]
    assert password not in proc.stderr + proc.stdout
    # Behaviour, not speed: no retrying for minutes (MLflow's default is about 4).
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


# kd-mlflow, paused before it opens its second nested run until the test says go: the
# test's way to stop the server exactly between two stages (nothing else is changed).
PAUSED_BEFORE_SECOND_CHILD = """
import pathlib, time
from kd_mlflow import tracking
from kd_mlflow.cli import program

opened, child = [], tracking.MlflowTracker.child

def paused_child(self, name, tags=None):
    opened.append(name)
    if len(opened) == 2:
        pathlib.Path("second-child.ready").touch()
        while not pathlib.Path("second-child.go").exists():
            time.sleep(0.05)
    return child(self, name, tags)

tracking.MlflowTracker.child = paused_child
program()
"""


def _sync(cwd: Path, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kd_mlflow", "sync", "runs"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_nested_run_opened_while_the_server_is_away_goes_offline_and_sync_nests_it(tmp_path):
    """kdparam over a 1x2 grid; the server is stopped after the first stage, before the second."""
    experiment = "outage-nested"
    server = Server(tmp_path).start()
    train = Training(tmp_path, server.url, "kdparam", "--epochs", "2", "--experiment", experiment,
                     "--teacher", "pretrained:fashion_mnist-resnet20", "--temperatures", "4", "--alphas", "0.5,0.9",
                     env_extra={"KD_TRACKING_OUTAGE_WAIT": "3"}, launcher=("-c", PAUSED_BEFORE_SECOND_CHILD))
    try:
        deadline = time.time() + 300
        while not (tmp_path / "second-child.ready").exists():
            assert train.proc.poll() is None and time.time() < deadline, "".join(train.stderr)[-3000:]
            time.sleep(0.1)
        server.stop()
        (tmp_path / "second-child.go").touch()
        rc, out, err = train.finish()
        assert rc == 75, err[-3000:]
        assert "starts offline as" in err, err[-3000:]
        records = {d.parent.name: json.loads((d / "run.json").read_text())
                   for d in (tmp_path / "runs").glob("*/offline")}
        [offline_id] = [k for k, r in records.items() if r.get("created_offline")]
        parent_id = records[offline_id]["parent_run_id"]
        assert set(records) == {offline_id, parent_id}  # the parent's own end waited in its directory

        server.start()
        sync = _sync(tmp_path, server.url)
        assert sync.returncode == 0, sync.stderr[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert len(runs) == 3, [r.info.run_name for r in runs]
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED"
        assert {"kdparam_grid.json", "figures"} <= {a.path for a in client.list_artifacts(parent_id)}
        children = {r.info.run_name: r for r in runs if r.info.run_id != parent_id}
        assert set(children) == {"kd-T4-alpha0.5", "kd-T4-alpha0.9"}
        for child in children.values():
            assert child.data.tags["mlflow.parentRunId"] == parent_id
            assert child.info.status == "FINISHED"
            assert child.data.params["temperature"] == "4.0" and child.data.tags["parent_mode"] == "kdparam"
            assert _steps(client, child.info.run_id, "train_loss") == [0, 1]
            assert "test_acc" in child.data.metrics
            assert {"config.json", "figures"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
            models = client.search_logged_models([parent.info.experiment_id],
                                                 filter_string=f"source_run_id = '{child.info.run_id}'")
            assert [m.name for m in models] == ["kd-resnet8"]  # <mode>-<student>
        second = children["kd-T4-alpha0.9"]
        assert second.data.params["alpha"] == "0.9"
        assert second.data.tags["kd_mlflow.synced_from"] == offline_id
        assert second.info.start_time == records[offline_id]["start_time"]

        again = _sync(tmp_path, server.url)
        assert again.returncode == 0 and again.stdout.count("nothing to do") == 2, again.stdout + again.stderr
        assert len(client.search_runs([parent.info.experiment_id])) == 3
    finally:
        train.proc.kill()
        server.stop()


def test_sync_nests_a_run_created_offline_under_a_parent_created_offline_too(tmp_path, monkeypatch):
    """A benchmark's pair opened while the server was away, and the pair's own stage: sync
    creates the pair under the benchmark's run, then the stage under the pair's new run."""
    import mlflow
    from mlflow import MlflowClient

    from kd_mlflow import tracking
    from kd_mlflow.tracking import sync
    from kd_mlflow.config import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking.offline, "OFFLINE_DIRS", [])  # this process's CLI must not see them
    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        with tracking.start_run({"experiment": "offline-tree"}, {"mode": "benchmark"}, run_name="top") as top:
            reach = top._reach
            top._reach = lambda fn, what: (False, None)  # the server did not come back within the wait
            with top.child("pair", tags={"mode": "kdparam"}) as pair:
                top._reach = reach
                pair.log_params({"seed": 0})
                with pair.child("cell", tags={"mode": "kd"}) as cell:
                    cell.log_params({"temperature": 4.0})
                    cell.log_metrics({"train_loss": 1.5}, step=0)
        client = MlflowClient(uri)
        [top_run] = client.search_runs([client.get_experiment_by_name("offline-tree").experiment_id])
        assert top_run.info.status == "FINISHED"
        with pytest.raises(ConfigError, match="sync it first"):  # the cell alone: its parent is not synced yet
            sync.sync(Path("runs") / cell.run_id / "offline", echo=lambda _: None)
        synced = sync.sync("runs", echo=lambda _: None)
        runs = {r.info.run_name: r for r in client.search_runs([top_run.info.experiment_id])}
        assert set(runs) == {"top", "pair", "cell"}
        assert synced == [runs["pair"].info.run_id, runs["cell"].info.run_id]  # parents first
        assert runs["pair"].data.tags["mlflow.parentRunId"] == top_run.info.run_id
        assert runs["cell"].data.tags["mlflow.parentRunId"] == runs["pair"].info.run_id
        assert runs["pair"].data.params == {"seed": "0"} and runs["cell"].data.params == {"temperature": "4.0"}
        assert runs["cell"].data.metrics == {"train_loss": 1.5} and runs["cell"].data.tags["mode"] == "kd"
        assert {r.info.status for r in runs.values()} == {"FINISHED"}
    finally:
        mlflow.set_tracking_uri(None)


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
