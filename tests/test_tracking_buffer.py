"""The metric buffer's bound and the URI redaction, without a server: the "server" is a
closed 127.0.0.1 port, so every delivery fails with connection refused (real sockets)."""

from __future__ import annotations

import json

from conftest import free_port, sqlite_store

from kd_mlflow import tracking


def test_redact_hides_credentials_only():
    assert tracking.redact("http://alice:s3cret@host:5000/x") == "http://alice:***@host:5000/x"
    assert tracking.redact("postgresql://u:p%40ss@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert tracking.redact("https://token@host") == "https://***@host"
    assert tracking.redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking.redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_buffer_is_bounded_and_loses_nothing_when_the_server_never_answers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking.metrics, "MAX_BUFFERED_METRICS", 10)  # where _MetricBuffer reads it
    monkeypatch.setenv("KD_TRACKING_OUTAGE_WAIT", "0")
    link = tracking._Link(f"http://127.0.0.1:{free_port()}")
    offline = tracking._Offline("r" * 32, link)
    buffer = tracking._MetricBuffer("r" * 32, link, offline)
    for step in range(25):
        buffer.add({"loss": step / 10}, step)
    assert len(buffer.pending) == 10  # the 15 oldest went to disk, not away
    lines = (offline.dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(15))
    buffer.close()  # the server never answers: the rest follows, in order
    rows = [json.loads(x) for x in (offline.dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in rows] == [("loss", s, s / 10) for s in range(25)]
    assert link.gave_up and offline.used


def test_flush_waits_until_every_point_is_in_the_run(tmp_path, monkeypatch, own_tracking_uri):
    """Registering a model picks the champion by test_acc, so the tracker flushes its
    buffer first: after flush() the store must hold every point (a real SQLite store)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path, "flush.db")
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("flush")).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    own_tracking_uri(uri)  # the buffer's MlflowClient() reads the process-wide URI
    link = tracking._Link(uri)
    buffer = tracking._MetricBuffer(run_id, link, tracking._Offline(run_id, link))
    for step in range(3000):  # three batches of 1000
        buffer.add({"loss": step / 10}, step)
    buffer.add({"test_acc": 91.5}, None)
    assert buffer.flush(timeout=120)
    assert not buffer.pending
    assert len(client.get_metric_history(run_id, "loss")) == 3000
    assert client.get_run(run_id).data.metrics["test_acc"] == 91.5
    buffer.close()


def test_runs_that_log_the_same_new_datasets_at_once_all_get_them(mlflow_server, tmp_path, monkeypatch):
    """`benchmark --jobs N` starts cells together, and each logs the same Datasets (same
    name and digest) into one experiment: the server refuses the second insert of a row
    that another run created a moment before. Real runs on the real test server, started
    behind a barrier, rounds of fresh datasets until the race has been run often."""
    import threading
    import uuid

    import mlflow

    from kd_mlflow.tracking import MlflowTracker, dataset_inputs

    monkeypatch.chdir(tmp_path)  # the trackers' offline directories
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"datasets-race-{uuid.uuid4().hex[:8]}")
    mlflow.set_tracking_uri(mlflow_server)
    try:
        for round_ in range(5):
            digest = uuid.uuid4().hex  # new rows every round
            datasets = [{"name": f"d-{context}", "context": context, "source": "/data", "digest": digest,
                         "rows": 10, "file": "train", "image": "uint8 1x28x28"} for context in ("train", "test")]
            runs = [client.create_run(experiment).info.run_id for _ in range(6)]
            barrier, errors = threading.Barrier(len(runs)), []

            def log(run_id):
                tracker = MlflowTracker(run_id)
                barrier.wait()
                try:
                    tracker._log_inputs(dataset_inputs(datasets))
                except Exception as exc:  # noqa: BLE001 (collected and asserted below)
                    errors.append(exc)

            threads = [threading.Thread(target=log, args=(r,)) for r in runs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, (round_, errors)
            for run_id in runs:
                got = {d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs}
                assert got == {"d-train", "d-test"}, (round_, run_id)
    finally:
        mlflow.set_tracking_uri(None)
