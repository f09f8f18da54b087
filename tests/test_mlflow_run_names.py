"""`mlflow run` as people type it, against a real tracking server: the run's name, what
-P experiment does there, and the runs a failed launcher leaves RUNNING (conda missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from conftest import BIN, REPO, unique_experiment

pytestmark = pytest.mark.e2e

SMALL = {"train_subset": 200, "val_size": 100, "test_subset": 100, "batch_size": 50, "epochs": 1, "device": "cpu"}


def launch(server: str, entry: str, experiment: str, params: dict, *extra: str, env_manager: str | None = "local",
           path: str | None = None):
    """`mlflow run . -e ENTRY --experiment-name EXPERIMENT [--env-manager M] EXTRA -P ...` from the repo root."""
    cmd = [str(BIN / "mlflow"), "run", ".", "-e", entry, "--experiment-name", experiment, *extra]
    if env_manager:
        cmd += ["--env-manager", env_manager]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_CONDA_HOME")}
    env.update(MLFLOW_TRACKING_URI=server, PATH=path or f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def runs_clean(server: str, *args: str, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    return subprocess.run([str(BIN / "kd-mlflow"), "runs", "clean", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**env, "MLFLOW_TRACKING_URI": server})


def test_mlflow_generated_names_are_told_from_chosen_ones():
    from mlflow.utils.name_utils import _generate_random_name

    from kd_mlflow.tracking import is_mlflow_generated_name

    assert all(is_mlflow_generated_name(_generate_random_name()) for _ in range(2000))
    for chosen in ("mine", "nokd-resnet8", "kd-resnet8", "teacher-resnet20", "lr-sweep-3", "gifted-auk"):
        assert not is_mlflow_generated_name(chosen), chosen


def test_mlflow_run_names_the_run_unless_the_user_did(tracking):
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    named_by_us, named_by_user = unique_experiment("names"), unique_experiment("names-mine")
    proc = launch(tracking, "nokd", named_by_us, SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(client, named_by_us)
    assert (run.info.run_name, run.data.tags["mlflow.runName"], run.info.status) == ("nokd-resnet8", "nokd-resnet8",
                                                                                  "FINISHED")
    assert run.data.tags.get("kd_mlflow.heartbeat")  # the liveness sign runs clean reads

    proc = launch(tracking, "nokd", named_by_user, {**SMALL, "student": "resnet14"}, "--run-name", "mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(client, named_by_user)
    assert (run.info.run_name, run.data.tags["mlflow.runName"], run.info.status) == ("mine", "mine", "FINISHED")


def test_experiment_param_elsewhere_is_refused_in_one_line(tracking):
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    chosen, other = unique_experiment("chosen"), unique_experiment("other")
    started = time.monotonic()
    proc = launch(tracking, "nokd", chosen, {**SMALL, "experiment": other})
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert ours == [f"error: -P experiment={other} cannot take effect: `mlflow run` has already created this run "
                    f"in experiment {chosen!r}, and a run cannot move; choose the experiment with "
                    f"`mlflow run . -e nokd --experiment-name {other}` (without -P experiment)"], proc.stderr[-3000:]
    run = only_run(client, chosen)
    assert run.info.status == "FAILED" and "mode" not in run.data.tags  # refused before kd-mlflow adopted it
    assert client.get_experiment_by_name(other) is None  # no run, no experiment made elsewhere
    assert time.monotonic() - started < 60


def test_experiment_param_naming_the_chosen_experiment_passes(tracking, monkeypatch):
    from mlflow import MlflowClient

    from kd_mlflow.config import ConfigError
    from kd_mlflow.tracking import check_launcher_experiment

    client = MlflowClient(tracking)
    name = unique_experiment("same")
    exp_id = client.create_experiment(name)
    run = client.create_run(exp_id)  # what `mlflow run --experiment-name NAME` made
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    for same in ("", name, exp_id):
        check_launcher_experiment(same)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    with pytest.raises(ConfigError, match="--experiment-name elsewhere"):
        check_launcher_experiment("elsewhere")
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_runs_clean_finds_what_a_launcher_without_conda_left_running(tracking, monkeypatch):
    from mlflow import MlflowClient

    from kd_mlflow import tracking as kd_tracking

    client = MlflowClient(tracking)
    experiment = unique_experiment("clean")
    path = ":".join(d for d in [str(BIN), "/usr/bin", "/bin"] if not shutil.which("conda", path=d))
    assert shutil.which("conda", path=path) is None
    proc = launch(tracking, "nokd", experiment, {"epochs": 1}, env_manager=None, path=path)
    assert proc.returncode != 0 and "Could not find Conda executable" in proc.stderr, proc.stderr[-2000:]
    orphan = only_run(client, experiment)
    assert orphan.info.status == "RUNNING" and "mode" not in orphan.data.tags  # our code never started

    exp_id = orphan.info.experiment_id
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # start_run's set_experiment sets it: undone after the test
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    stamp = str(int((time.time() - 3600) * 1000))
    crashed = client.create_run(exp_id, run_name="kd-crashed", tags={"mode": "kd", "kd_mlflow.heartbeat": stamp})
    foreign = client.create_run(exp_id, run_name="someone-elses")  # no sign of life to judge: never touched
    with kd_tracking.start_run({"experiment": experiment}, {"mode": "nokd"}, run_name="finished") as done:
        pass
    finished = client.get_run(done.run_id)
    with kd_tracking.start_run({"experiment": experiment}, {"mode": "nokd"}, run_name="alive") as live:
        listed = runs_clean(tracking, "--experiment", experiment, "--older-than", "0")
        assert listed.returncode == 0, listed.stderr
        assert client.get_run(orphan.info.run_id).info.status == "RUNNING"  # without --yes, only listed
        cleaned = runs_clean(tracking, "--experiment", experiment, "--older-than", "0", "--yes")
        assert cleaned.returncode == 0, cleaned.stderr
        assert client.get_run(live.run_id).info.status == "RUNNING"
    out = listed.stdout
    assert "2 whose process is gone" in out and "kd-mlflow never started in it" in out, out
    assert orphan.info.run_name in out and "kd-crashed" in out
    assert all(r not in out for r in (live.run_id, foreign.info.run_id, finished.info.run_id)), out
    assert "marked 2 run(s) FAILED" in cleaned.stdout, cleaned.stdout
    for run_id in (orphan.info.run_id, crashed.info.run_id):
        after = client.get_run(run_id)
        assert after.info.status == "FAILED" and after.data.tags["kd_mlflow.cleaned"], run_id
    assert client.get_run(foreign.info.run_id).info.status == "RUNNING"
    assert client.get_run(live.run_id).info.status == "FINISHED"
    after = client.get_run(finished.info.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", finished.info.end_time)
    assert "kd_mlflow.cleaned" not in after.data.tags


def test_runs_clean_reports_disk_and_frees_only_what_no_run_needs(tracking, tmp_path, monkeypatch):
    """runs/ after real runs of each kind: a FINISHED one (its files are in MLflow), a KILLED
    one with its epoch checkpoint (resumable), a RUNNING one, an offline directory waiting
    for sync, and a directory of a run this store does not know."""
    from mlflow import MlflowClient

    from kd_mlflow import tracking as kd_tracking

    client = MlflowClient(tracking)
    experiment = unique_experiment("disk")
    monkeypatch.chdir(tmp_path)
    with kd_tracking.start_run({"experiment": experiment}, {"mode": "nokd"}, run_name="finished") as done:
        pass
    exp_id = client.get_run(done.run_id).info.experiment_id
    killed = client.create_run(exp_id, run_name="killed", tags={"mode": "nokd"})
    client.set_terminated(killed.info.run_id, "KILLED")
    running = client.create_run(exp_id, run_name="running", tags={"mode": "nokd"})
    sizes = {done.run_id: 3_000_000, killed.info.run_id: 2_000_000, running.info.run_id: 1_000_000,
             "0" * 32: 500_000, "f" * 32: 700_000}
    for run_id, size in sizes.items():
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "last.pt").write_bytes(b"x" * size)
    (tmp_path / "runs" / ("f" * 32) / "offline").mkdir()  # an offline run: never judged by its status

    listed = runs_clean(tracking, "--experiment", experiment, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert "runs/: 5 run directories, 6.9 MB; 1 no run needs, 2.9 MB" in out, out
    assert f"{done.run_id}      2.9 MB  free: FINISHED" in out, out
    assert f"{killed.info.run_id}      1.9 MB  keep: KILLED: resumable with --resume {killed.info.run_id}" in out
    assert f"{running.info.run_id}      1.0 MB  keep: RUNNING" in out
    assert "keep: no such run in this tracking store" in out and "keep: waits for `kd-mlflow sync" in out
    assert "nothing deleted; pass --yes" in out and len(list((tmp_path / "runs").iterdir())) == 5

    freed = runs_clean(tracking, "--experiment", experiment, "--yes", cwd=tmp_path)
    assert freed.returncode == 0, freed.stderr
    assert "freed 2.9 MB (1 directory)" in freed.stdout, freed.stdout
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(set(sizes) - {done.run_id})
    client.set_terminated(running.info.run_id, "KILLED")
