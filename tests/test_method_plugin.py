"""A method from another pip package: a tiny package, written and pip-installed here from
a temporary directory (into a --target folder on PYTHONPATH, so the shared environment is
untouched), registers one method under the kd_mlflow.methods entry-point group; with no
change to kd-mlflow it is listed, validated, trained end to end through `mlflow run -e
train` against the real server, and compared."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import BIN, REPO, TINY, mlflow_run, runs_of, unique_experiment

pytestmark = pytest.mark.e2e

DECLARATION = '''
from kd_mlflow.methods.spec import Mode, Param, at_least, feature_parameters

METHOD = Mode(
    "logitmatch", "Logit matching (Ba & Caruana 2014): CE plus the mean squared error between logits.",
    "distiller",
    feature_parameters(Param("lm_weight", "float", 0.5, "logitmatch: weight of the logit MSE.", at_least(0))),
    "kd_logitmatch.distiller:LogitMatching", terms=("ce", "lm"))
'''

DISTILLER = '''
import torch.nn.functional as F

from kd_mlflow.methods.base import Distiller


class LogitMatching(Distiller):
    def forward(self, x, y):
        teacher_logits = self.teacher_logits(x)
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits.float(), y),
                        "lm": self.cfg.lm_weight * F.mse_loss(logits.float(), teacher_logits.float())}
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "kd-logitmatch"
version = "0.1"

[project.entry-points."kd_mlflow.methods"]
logitmatch = "kd_logitmatch:METHOD"

[tool.setuptools]
packages = ["kd_logitmatch"]
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    source = tmp_path_factory.mktemp("kd-logitmatch")
    (source / "kd_logitmatch").mkdir()
    (source / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (source / "kd_logitmatch" / "__init__.py").write_text(textwrap.dedent(DECLARATION))
    (source / "kd_logitmatch" / "distiller.py").write_text(textwrap.dedent(DISTILLER))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    assert list(target.glob("kd_logitmatch-0.1.dist-info/entry_points.txt"))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH", "")]))}


def kd_mlflow(args, env):
    return subprocess.run([str(BIN / "kd-mlflow"), *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_an_installed_method_is_listed_and_validated(plugin_env):
    listed = kd_mlflow(["modes"], plugin_env)
    assert listed.returncode == 0, listed.stderr
    line = next(l for l in listed.stdout.splitlines() if l.startswith("logitmatch "))
    assert "distiller" in line and "[kd-logitmatch]" in line
    assert "logitmatch" in kd_mlflow(["modes", "--kind", "distiller"], plugin_env).stdout.split(",")[-1]
    helped = kd_mlflow(["train", "--help"], plugin_env)
    assert "logitmatch" in helped.stdout
    own = kd_mlflow(["train", "logitmatch", "--help"], plugin_env)
    assert "--lm-weight" in own.stdout and "logitmatch: weight of the logit MSE." in own.stdout
    bad = kd_mlflow(["train", "logitmatch", "--lm-weight", "-1"], plugin_env)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: lm_weight must be >= 0, got -1.0"
    # tune knows its parameters: the space is checked against the installed mode's declaration
    tuned = kd_mlflow(["tune", "logitmatch", "--space", "lm_wieght=uniform:0:1"], plugin_env)
    assert tuned.returncode == 2 and "logitmatch has no parameter 'lm_wieght'" in tuned.stderr
    assert "lm_weight" in tuned.stderr.split("its parameters are:")[1]
    # the committed MLproject does not depend on what is installed
    assert kd_mlflow(["mlproject", "--check"], plugin_env).returncode == 0
    # without the package, the mode does not exist
    assert "logitmatch" not in kd_mlflow(["modes"], {}).stdout


def test_an_installed_method_trains_through_mlflow_run_and_is_compared(plugin_env, mlflow_server):
    experiment = unique_experiment("plugin")
    params = {**TINY, "epochs": 1, "teacher": "pretrained:fashion_mnist-resnet20", "lm_weight": 0.25}
    mlflow_run("train", mlflow_server, experiment, {"mode": "logitmatch", **params}, env=plugin_env)
    client, runs = runs_of(mlflow_server, experiment)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "logitmatch" and run.data.params["lm_weight"] == "0.25"
    assert {"loss_ce", "loss_lm", "test_acc"} <= set(run.data.metrics)
    compared = subprocess.run([str(BIN / "kd-mlflow"), "compare", "--experiment", experiment],
                              cwd=REPO, env={**os.environ, **plugin_env, "MLFLOW_TRACKING_URI": mlflow_server},
                              capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr
    assert "logitmatch" in compared.stdout
