"""`kd-mlflow server`, the team tracking server: what fails before anything starts (an
unreachable or silent PostgreSQL, a taken or invalid port, a missing driver), each with
one line; and, with PostgreSQL (KD_TEST_POSTGRES_URI), a real server on a fresh database:
/health, bound to 127.0.0.1 only, a run with an artifact logged through it and read back,
the rows in PostgreSQL, and SIGTERM stopping it and every worker."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import (BIN, descendants, fresh_postgres_database, free_port, listening_sockets, process_table,
                      require_postgres, wait_for_http)

from kd_mlflow.cli import main


def kd_server(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kd-mlflow"), "server", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


@contextlib.contextmanager
def listening_port():
    """A 127.0.0.1 port that accepts TCP connections (the kernel does the handshake) and
    never answers: taken, and silent."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.mark.e2e
def test_unreachable_postgres_fails_fast_naming_the_fix(tmp_path):
    closed = free_port()  # bound and released: nothing listens there
    started = time.monotonic()
    out = kd_server("--backend-store-uri", f"postgresql://kd_mlflow:s3cret@127.0.0.1:{closed}/kd_mlflow",
                    "--port", str(free_port()), "--artifacts-destination", str(tmp_path / "artifacts"), cwd=tmp_path)
    assert time.monotonic() - started < 10
    line = one_error_line(out)
    assert f"cannot connect to PostgreSQL at postgresql://kd_mlflow:***@127.0.0.1:{closed}/kd_mlflow" in line
    assert "Connection refused" in line and "start PostgreSQL" in line, line
    assert "s3cret" not in out.stdout + out.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlartifacts").exists()


@pytest.mark.e2e
def test_silent_postgres_times_out_within_about_ten_seconds(tmp_path):
    # A port that accepts TCP connections (the kernel completes the handshake) but never
    # speaks the PostgreSQL protocol, like a hung server or a firewall that swallows packets.
    with listening_port() as port:
        started = time.monotonic()
        out = kd_server("--backend-store-uri", f"postgresql://kd_mlflow@127.0.0.1:{port}/kd_mlflow",
                        "--port", str(free_port()), cwd=tmp_path)
        elapsed = time.monotonic() - started
    line = one_error_line(out)
    assert "cannot connect to PostgreSQL" in line and "timeout" in line.lower() and "start PostgreSQL" in line, line
    # Behaviour, not speed: it waited for the connect timeout (not refused at once) and then
    # gave up, instead of retrying for minutes. The upper bound leaves room for the process
    # start on a loaded 2-core machine (15.2 s seen with two pytest-xdist workers).
    assert 5 < elapsed < 60, elapsed


@pytest.mark.e2e
def test_wrong_password_and_missing_database_name_the_fix(tmp_path):
    import urllib.parse

    parts = urllib.parse.urlsplit(require_postgres())
    user, host = parts.username, f"{parts.hostname}:{parts.port or 5432}"
    wrong = kd_server("--backend-store-uri", f"postgresql://{user}:not-the-password@{host}/postgres",
                      "--port", str(free_port()), cwd=tmp_path)
    line = one_error_line(wrong)
    assert "password authentication failed" in line and "~/.pgpass" in line and "not-the-password" not in line
    missing = kd_server("--backend-store-uri", urllib.parse.urlunsplit(parts._replace(path="/kd_no_such_db")),
                        "--port", str(free_port()), cwd=tmp_path)
    line = one_error_line(missing)
    assert 'database "kd_no_such_db" does not exist' in line and "createdb" in line, line


@pytest.mark.e2e
def test_taken_port_fails_before_anything_starts(tmp_path):
    with listening_port() as port:
        out = kd_server("--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--port", str(port), cwd=tmp_path)
    line = one_error_line(out)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line, line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args,needle", [
    (["--port", "0"], "Invalid value for '--port'"),
    (["--port", "70000"], "Invalid value for '--port'"),
    (["--port"], "Option '--port' requires an argument"),
])
def test_invalid_or_missing_port_value(args, needle):
    out = CliRunner().invoke(main, ["server", *args])
    assert out.exit_code == 2 and needle in out.output, out.output


def test_missing_driver_names_the_extra(monkeypatch, tmp_path):
    from kd_mlflow.config import DEFAULT_BACKEND_STORE_URI
    from kd_mlflow.server import postgres_driver

    driver = postgres_driver(DEFAULT_BACKEND_STORE_URI)  # psycopg with SQLAlchemy 2.1+, else psycopg2
    monkeypatch.setitem(sys.modules, driver, None)  # as if not installed: the import fails
    out = CliRunner().invoke(main, ["server", "--port", str(free_port()), "--artifacts-destination",
                                    str(tmp_path / "a")])
    assert out.exit_code == 2
    assert f"the PostgreSQL driver {driver} " in out.output and "is not installed" in out.output
    assert "pip install 'kd-mlflow[server]'" in out.output and len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_postgres_scheme_spelling_and_password_redaction():
    from kd_mlflow.server import ServerError, libpq_uri, postgres_driver, redact, serve

    assert postgres_driver("postgresql://u@h/d") in ("psycopg", "psycopg2")
    assert postgres_driver("postgresql+psycopg2://u@h/d") == "psycopg2"
    assert postgres_driver("sqlite:///x.db") is None
    assert libpq_uri("postgresql+psycopg://u:p@h:1/d?sslmode=require") == "postgresql://u:p@h:1/d?sslmode=require"
    assert redact("postgresql://u:p%40ss@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact("postgresql://u@h/d") == "postgresql://u@h/d"
    with pytest.raises(ServerError, match="write postgresql://"):
        serve("postgres://u@h/d", "x", "127.0.0.1", free_port(), 1)


# ------------------------------------------------------------ a real server on PostgreSQL
def listening_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port``."""
    return {address for address, p, _ in listening_sockets() if p == port}


def alive(pids: set[int], session: int | None = None) -> set[int]:
    """Those of ``pids`` still running, plus any live process of ``session``."""
    table = process_table()
    return {p for p, (_, state, sid) in table.items()
            if state != "Z" and (p in pids or sid == session)}  # a zombie has stopped


@pytest.mark.e2e
def test_team_server_on_postgres_logs_a_run_and_stops_cleanly(tmp_path):
    from mlflow import MlflowClient

    from kd_mlflow.server import connect_postgres

    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc to inspect sockets and processes")
    with fresh_postgres_database("kd_server") as backend:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "server.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([str(BIN / "kd-mlflow"), "server", "--backend-store-uri", backend,
                                     "--artifacts-destination", str(tmp_path / "artifacts"), "--port", str(port),
                                     "--workers", "2"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_http(url + "/health", timeout=240, proc=proc)
            # the default host is loopback: the only listening socket is 127.0.0.1's
            assert listening_addresses(port) == {"127.0.0.1"}

            client = MlflowClient(url)
            experiment_id = client.create_experiment(f"server-{port}")
            run = client.create_run(experiment_id)
            run_id = run.info.run_id
            assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied
            client.log_param(run_id, "mode", "kd")
            for step, value in enumerate((0.5, 0.25)):
                client.log_metric(run_id, "train_loss", value, step=step)
            note = tmp_path / "note.txt"
            note.write_text("distilled through PostgreSQL\n")
            client.log_artifact(run_id, str(note), "notes")
            client.set_terminated(run_id)

            back = MlflowClient(url).get_run(run_id)
            assert back.info.status == "FINISHED" and back.data.params["mode"] == "kd"
            history = MlflowClient(url).get_metric_history(run_id, "train_loss")
            assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.25)]
            assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
            fetched = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "fetched"))
            assert Path(fetched).read_text() == "distilled through PostgreSQL\n"
            stored = list((tmp_path / "artifacts").rglob("note.txt"))  # where the server put it
            assert len(stored) == 1 and run_id in str(stored[0])
            conn = connect_postgres(backend)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
                    assert cur.fetchall() == [("FINISHED",)]
            finally:
                conn.close()
            workers = descendants(proc.pid)
            assert len(workers) >= 4, workers  # mlflow server, uvicorn, its 2 workers
            session = process_table()[proc.pid][2]
            (server_pid,) = [p for p in workers if process_table()[p][0] == proc.pid]
            assert process_table()[server_pid][2] == server_pid != session  # its own session
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in descendants(proc.pid) | {proc.pid}:  # never leave it behind
                    os.kill(pid, signal.SIGKILL)
                raise
        output = log_path.read_text()
        assert code == 0, output[-3000:]
        assert f"tracking server ready at {url}" in output and f"export MLFLOW_TRACKING_URI={url}" in output
        assert "listening on 127.0.0.1 only" in output and "stopped (SIGTERM)" in output
        deadline = time.monotonic() + 5  # kd-mlflow exits once the whole process group is gone
        while alive(workers, server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(workers, server_pid), f"still running after SIGTERM: {alive(workers, server_pid)}"
        assert listening_addresses(port) == set()
