"""No secret in any message (issue 12, item 3): with credentials in MLFLOW_TRACKING_URI
and MLFLOW_REGISTRY_URI, every CLI path that names the server prints it through
``tracking.redact`` and the passwords reach neither stdout nor stderr.

The error paths run `kd-mlflow` as a subprocess against a real `mlflow server` (MLflow's
client sends the URI's user and password as basic auth; a server without auth ignores
them). Each fails in seconds, before any training."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from click.testing import CliRunner
from conftest import BIN, free_port

from kd_mlflow.cli import main
from kd_mlflow.tracking import redact

TRACKING_PASSWORD = "s3cr3t-PASSWORD"
REGISTRY_PASSWORD = "r3g1stry-PASSWORD"
SECRETS = (TRACKING_PASSWORD, REGISTRY_PASSWORD)
TINY = ["--train-subset", "200", "--val-size", "100", "--test-subset", "100", "--epochs", "1", "--device", "cpu"]
TRACKING_SHOWN = "http://alice:***@127.0.0.1:"
REGISTRY_SHOWN = "http://bob:***@127.0.0.1:"


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@", 1)


def kd_mlflow(args, server: str, cwd) -> subprocess.CompletedProcess:
    """`kd-mlflow ARGS` in a fresh process, its tracking and registry URIs carrying passwords."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")}  # the CLI must turn it on itself
    env.update(MLFLOW_TRACKING_URI=with_credentials(server, "alice", TRACKING_PASSWORD),
               MLFLOW_REGISTRY_URI=with_credentials(server, "bob", REGISTRY_PASSWORD),
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    return subprocess.run([str(BIN / "kd-mlflow"), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_masked(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert_masked(proc.stdout + proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_redact_masks_every_uri_in_a_message():
    text = ("API request to http://alice:s3cr3t-PASSWORD@127.0.0.1:5000/api/2.0/x?q=a@b failed "
            "(also https://tok3n@host and postgresql://u:p%40ss@h/d; mail a@b.c, sqlite:///mlflow.db)")
    assert redact(text) == ("API request to http://alice:***@127.0.0.1:5000/api/2.0/x?q=a@b failed "
                            "(also https://***@host and postgresql://u:***@h/d; mail a@b.c, sqlite:///mlflow.db)")
    assert redact("http://u:p@ss@host/x") == "http://u:***@host/x"  # an unencoded @: masked up to the last one


# --------------------------------------------- against a real server, as a subprocess
@pytest.mark.parametrize("args,needles", [
    (["compare", "--experiment", f"no-such-experiment-{uuid.uuid4().hex[:8]}"],
     ["does not exist at " + TRACKING_SHOWN]),
    (["models", "pull", f"no-such-model-{uuid.uuid4().hex[:8]}", "-o", "{tmp}/pulled"],
     ["has no versions at " + REGISTRY_SHOWN]),
    (["models", "pull", f"no-such-model-{uuid.uuid4().hex[:8]}/3", "-o", "{tmp}/pulled"],
     ["is not in the registry at " + REGISTRY_SHOWN, "RESOURCE_DOES_NOT_EXIST"]),
    (["train", "kd", "--resume", "0123456789abcdef0123456789abcdef", *TINY],
     ["cannot resume", "in the tracking store " + TRACKING_SHOWN]),
    (["train", "kd", "--teacher-checkpoint", "models:/nope/1", *TINY],
     ["cannot fetch models:/nope/1 from the registry at " + REGISTRY_SHOWN]),
], ids=["compare-unknown-experiment", "pull-unknown-model", "pull-unknown-version", "resume-unknown-run",
        "models-teacher-unknown"])
def test_error_naming_the_server_masks_its_password(mlflow_server, tmp_path, args, needles):
    proc = kd_mlflow([a.replace("{tmp}", str(tmp_path)) for a in args], mlflow_server, tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "pulled").exists()


@pytest.mark.parametrize("args", [["compare", "--experiment", "x"], ["models", "list"],
                                  ["models", "champion", "x"], ["models", "pull", "x", "-o", "{tmp}/pulled"],
                                  ["train", "kd", *TINY]],
                         ids=["compare", "models-list", "models-champion", "models-pull", "train"])
def test_unreachable_server_masks_its_password(tmp_path, args):
    """A closed port: the server check's one line, at once (not MLflow's retries and traceback)."""
    proc = kd_mlflow([a.replace("{tmp}", str(tmp_path)) for a in args], f"http://127.0.0.1:{free_port()}", tmp_path)
    assert_one_line_error(proc, "is unreachable (connection refused)", "***@127.0.0.1:")


def test_success_output_masks_the_password(mlflow_server, tmp_path):
    """MLflow itself prints "View run at <tracking URI>/#/..." when a run ends; the CLI turns
    that off when the URI holds credentials."""
    from mlflow import MlflowClient

    name = f"empty-{uuid.uuid4().hex[:8]}"
    MlflowClient(mlflow_server).create_experiment(name)
    proc = kd_mlflow(["compare", "--experiment", name], mlflow_server, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"compared experiment {name!r}" in proc.stdout
    assert_masked(proc.stdout + proc.stderr)


def test_server_command_masks_a_backend_password(tmp_path):
    """libpq quotes the URI it cannot parse; `kd-mlflow server` masks it there too."""
    proc = kd_mlflow(["server", "--backend-store-uri", f"postgresql://u:{TRACKING_PASSWORD}@[bad/db",
                      "--port", free_port()], "http://127.0.0.1:1", tmp_path)
    assert_one_line_error(proc, "invalid PostgreSQL URI postgresql://u:***@[bad/db")


# ------------------------------------- MLflow's own errors that escape a command
@pytest.fixture()
def closed_port_with_credentials(monkeypatch):
    """The tracking URI of a closed port, with a password; our server check switched off so
    MLflow's client meets the closed port itself and raises its own error, URI included."""
    import mlflow

    uri = with_credentials(f"http://127.0.0.1:{free_port()}", "alice", TRACKING_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # the CLI sets it; restored after
    monkeypatch.setattr("kd_mlflow.tracking.check_tracking_server", lambda *args, **kwargs: None)
    monkeypatch.setattr("kd_mlflow.tracking.health.check_tracking_server", lambda *args, **kwargs: None)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_mlflow_error_escaping_a_command_is_one_masked_line(closed_port_with_credentials):
    result = CliRunner().invoke(main, ["models", "list"])
    assert_masked(result.output)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MlflowException: API request to " + TRACKING_SHOWN), lines


def test_any_other_error_keeps_its_traceback_masked(closed_port_with_credentials, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError(f"a bug while talking to {closed_port_with_credentials}")

    monkeypatch.setattr("kd_mlflow.tracking.registry.model_table", broken)
    result = CliRunner().invoke(main, ["models", "list"])
    assert_masked(result.output)
    assert result.exit_code == 1, result.output
    assert "Traceback" in result.output and "RuntimeError: a bug while talking to " + TRACKING_SHOWN in result.output
