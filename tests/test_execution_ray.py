"""The execution layer on a real Ray: the same cells give bit-identical numbers in this
process, on a local Ray and on a 2-node ``ray.cluster_utils.Cluster``; a node killed in the
middle of a cell costs a retry that continues the same MLflow run from its checkpoint; a
SIGTERM to the driver stops every cell (KILLED, exit 143) and the same command continues
them. Against the real test server (a cluster's workers need one they reach)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import cli_options as _options, learned_metrics, unique_experiment
from test_compare_registry import clean_mlflow_env

pytestmark = pytest.mark.e2e
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CELL = dict(teacher="pretrained:fashion_mnist-resnet20", epochs=1, train_subset=256, val_size=100,
            test_subset=200, batch_size=64, device="cpu", threads=1)
# long enough that a cell is still training when its first epoch checkpoint appears
LONG = dict(CELL, epochs=3, train_subset=1500, val_size=300, test_subset=300, batch_size=100)

def _cells(client, experiment: str) -> dict:
    """mode -> (run, every logged metric but timings as [(step, value)]) of the experiment's cells."""
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id], "tags.`kd_mlflow.cell` != ''"):
        assert run.data.tags["mode"] not in out, "a second run of one cell"
        out[run.data.tags["mode"]] = (run, learned_metrics(client, run))
    return out


@pytest.fixture
def cluster():
    """Two single-CPU worker nodes and a head that runs no cell, on this machine."""
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [made.add_node(num_cpus=1) for _ in range(2)]
    made.wait_for_nodes()
    yield made, nodes
    if ray.is_initialized():
        ray.shutdown()
    made.shutdown()


def test_same_numbers_in_process_on_local_ray_and_on_a_two_node_cluster(tracking, cluster, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    client = MlflowClient(tracking)
    made, _ = cluster
    base = ["benchmark", "--modes", "kd,nokd", "--seeds", "1", *_options(CELL)]
    paths = {"in-process": [],
             "local Ray": ["--jobs", "2", "--cpus-per-cell", "1"],
             "2-node cluster": ["--jobs", "0", "--ray-address", made.address, "--storage", str(tmp_path / "shared")]}
    cells, outputs = {}, {}
    for path, extra in paths.items():
        experiment = unique_experiment("ray-paths")
        out = CliRunner().invoke(main, [*base, *extra, "--experiment", experiment])
        assert out.exit_code == 0, f"{path}:\n{out.output}"
        cells[path], outputs[path] = _cells(client, experiment), out.output
    assert "Ray" not in outputs["in-process"]  # --jobs 1 starts no Ray
    assert "Ray (local)" in outputs["local Ray"] and "2 node(s)" not in outputs["local Ray"]
    assert "3 node(s)" in outputs["2-node cluster"]
    # the cluster's two cells ran at once, one on each worker node
    nodes = {line.rsplit(" on ", 1)[1].rstrip(")") for line in outputs["2-node cluster"].splitlines()
             if line.startswith("[") and "(run " in line}
    assert len(nodes) == 2, outputs["2-node cluster"]
    reference = cells["in-process"]
    assert set(reference) == {"kd", "nokd"}
    for path, found in cells.items():
        for mode, (run, learned) in found.items():
            assert run.info.status == "FINISHED"
            assert learned == reference[mode][1], (path, mode)
            for tag in ("code_version", "torch_version", "cpu_kind", "precision", "threads"):
                assert run.data.tags[tag] == reference[mode][0].data.tags[tag], (path, mode, tag)


def _driver(args: list[str], cwd: Path, server: str, *, sigint_ignored: bool = False) -> subprocess.Popen:
    """`python -m kd_mlflow ARGS`; ``sigint_ignored``: started as `cmd &` from a script is
    (POSIX ignores SIGINT in a non-interactive shell's background jobs), which every
    process it starts, Ray's workers included, inherits."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PYTHONPATH": str(REPO)}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS"):
        env.pop(var, None)
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, "-m", "kd_mlflow", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=ignore)


def _wait_for_checkpoints(storage: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> list[Path]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(storage.glob("*/last.pt")) if storage.exists() else []
        if len(found) >= n:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended first:\n{proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {n} epoch checkpoints in {storage}:\n{proc.stdout.read()}")


def test_a_killed_node_costs_a_retry_that_continues_the_same_run(mlflow_server, tmp_path, monkeypatch):
    """Kill the node that trains a cell after its first epoch: Ray retries the cell on the
    node added in its place, which continues the same MLflow run from the checkpoint on the
    shared storage and ends with the numbers of an uninterrupted run."""
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(mlflow_server)
    args = ["benchmark", "--modes", "nokd", "--seeds", "1", *_options(LONG)]
    reference = unique_experiment("ray-reference")
    out = CliRunner().invoke(main, [*args, "--experiment", reference])
    assert out.exit_code == 0, out.output

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        doomed = made.add_node(num_cpus=1)
        made.wait_for_nodes()
        storage = tmp_path / "shared"
        experiment = unique_experiment("ray-node-lost")
        proc = _driver([*args, "--ray-address", made.address, "--storage", str(storage), "--experiment", experiment],
                       tmp_path, mlflow_server)
        _wait_for_checkpoints(storage, 1, proc)
        made.remove_node(doomed, allow_graceful=False)  # SIGKILL: the cell's run is left RUNNING
        made.add_node(num_cpus=1)
        output, _ = proc.communicate(timeout=600)
    finally:
        made.shutdown()
    assert proc.returncode == 0, output
    assert "continued from its checkpoint" in output, output
    got, want = _cells(client, experiment)["nokd"], _cells(client, reference)["nokd"]
    assert got[0].info.status == "FINISHED"
    assert got[1] == want[1]


def test_sigterm_stops_every_cell_and_the_same_command_continues_them(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = unique_experiment("ray-sigterm")
    # The signal goes out when both cells have a checkpoint (kd's first comes after its first
    # of 3 epochs). The driver starts with SIGINT ignored, as `cmd &` in a script does: Ray
    # stops a cell by simulating SIGINT in it, which did nothing in workers that inherited
    # the ignore (their cells trained to the end, FINISHED), until each cell put Python's
    # SIGINT handler back.
    args = ["benchmark", "--modes", "nokd,kd", "--seeds", "1", "--jobs", "2", "--cpus-per-cell", "1",
            *_options(LONG), "--experiment", experiment]
    proc = _driver(args, tmp_path, mlflow_server, sigint_ignored=True)
    _wait_for_checkpoints(tmp_path / "runs", 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, output
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    stopped = {r.data.tags["mode"]: r for r in runs}
    # kd (a teacher forward per step) checkpoints last, so it is mid-training when the signal
    # lands; nokd, the faster cell, may already have finished its 3 epochs by then.
    statuses = {mode: run.info.status for mode, run in stopped.items()}
    assert statuses["benchmark"] == "KILLED" and statuses["kd"] == "KILLED", f"{statuses}\n{output}"
    assert statuses["nokd"] in ("KILLED", "FINISHED"), f"{statuses}\n{output}"
    killed = sum(stopped[m].info.status == "KILLED" for m in ("nokd", "kd"))

    again = _driver(args, tmp_path, mlflow_server)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    assert output.count("continued from its checkpoint") == killed, output
    cells = _cells(client, experiment)
    for mode in ("nokd", "kd"):  # the same runs, finished; no second run of a cell
        assert cells[mode][0].info.run_id == stopped[mode].info.run_id
        assert cells[mode][0].info.status == "FINISHED"


def test_a_cluster_is_refused_a_store_its_workers_cannot_reach(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from kd_mlflow.cli import main

    clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = CliRunner().invoke(main, ["benchmark", "--modes", "nokd", "--seeds", "1", "--ray-address", "10.0.0.1:6379",
                                    "--storage", str(tmp_path)])
    assert out.exit_code == 2
    assert "cannot reach the tracking store" in out.output and "mlflow server" in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    out = CliRunner().invoke(main, ["benchmark", "--modes", "nokd", "--seeds", "1", "--ray-address", "10.0.0.1:6379"])
    assert out.exit_code == 2 and "--storage" in out.output, out.output
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(store).search_runs(["0"])
