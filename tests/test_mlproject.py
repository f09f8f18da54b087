"""The MLproject, the CLI and the environment files are generated from / pinned to the
same sources; these tests fail when someone edits one and forgets the others."""

import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from kd_mlflow.cli import main
from kd_mlflow.config import Config
from kd_mlflow.mlproject import render_mlproject
from kd_mlflow.modes import MODES

REPO = Path(__file__).resolve().parent.parent
# The modes of the reference paper: each must stay an entry point (the registry may add more).
PAPER = ["nokd", "kd", "allkd", "kdparam", "triplet", "multikd", "uda", "takd", "ab", "oh", "rkd", "pkd", "sfd"]
DISTILLATION = [m for m in MODES if m != "teacher"]


def test_committed_mlproject_matches_the_registry():
    assert (REPO / "MLproject").read_text() == render_mlproject(), "run `kd-mlflow mlproject` and commit MLproject"


def test_every_mode_is_an_entry_point_with_its_parameters():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    entry = spec["entry_points"]
    assert set(PAPER) <= set(DISTILLATION)
    assert set(DISTILLATION) | {"teacher", "main", "train", "compare", "benchmark", "tune"} == set(entry)
    assert entry["train"]["command"] == "python entry_points/run.py train {mode}"  # any mode by name
    for name in DISTILLATION:
        params = entry[name]["parameters"]
        for common in ("dataset", "student", "epochs", "batch_size", "lr", "seed", "train_subset", "device", "data_dir"):
            assert common in params, (name, common)
        for field in MODES[name].fields:
            assert f"--{field} {{{field}}}" in entry[name]["command"]
            default = Config.default_for(name, field)
            expected = str(default).lower() if isinstance(default, bool) else str(default)
            assert str(params[field]["default"]) == expected, (name, field)
    assert entry["teacher"]["parameters"]["arch"]["default"] == "resnet20"
    assert entry["oh"]["parameters"]["oh_weight"]["default"] == 0.001
    assert entry["pkd"]["parameters"]["pkd_weight"]["default"] == 10.0


def test_cli_lists_commands_and_every_parameter_with_default():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "train" in top.output and "teacher" in top.output
    listing = runner.invoke(main, ["train", "--help"]).output
    for name in DISTILLATION:
        assert name in listing
    kd_help = runner.invoke(main, ["train", "kd", "--help"], terminal_width=200).output
    for field in MODES["kd"].fields:
        assert f"--{field.replace('_', '-')}" in kd_help
    assert "[default: 4.0]" in kd_help and "[default: 0.9]" in kd_help


def _pins(lines):
    return sorted(re.sub(r"\s", "", l) for l in lines if re.match(r"^[A-Za-z]", l.strip()))


def test_environment_files_pin_what_pyproject_pins():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    conda_pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    python_env = yaml.safe_load((REPO / "python_env.yaml").read_text())["dependencies"]
    assert _pins(deps) == _pins(conda_pip) == _pins(python_env)
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
