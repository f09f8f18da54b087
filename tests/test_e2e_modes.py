"""Every distillation mode end to end through `mlflow run . -e <mode> --env-manager local`
against the real tracking server, on a small real Fashion-MNIST subset: the run (or the
parent and its nested children), its loss terms, test_acc and the registered model."""

from __future__ import annotations

import pytest

from conftest import TINY, mlflow_run, runs_of, unique_experiment
from kd_mlflow.modes import MODES

pytestmark = pytest.mark.e2e

# what these tests check (terms logged, runs nested, models registered) needs few images
ONE_EPOCH = {**TINY, "epochs": 1, "train_subset": 400, "val_size": 200, "test_subset": 300}

# Every single-training mode of the registry runs here, except those with a test of their
# own (below, or nokd/kd in test_e2e_core.py), with the loss terms its declaration names.
OWN_TEST = {"nokd", "kd", "ab", "multikd"}
EXTRA = {
    "uda": {"labeled_fraction": 0.5},
    "dist": {"logit_standardization": "true"},  # a boolean parameter through -P
}
SINGLE = {m: (EXTRA.get(m, {}), spec.terms)
          for m, spec in MODES.items() if spec.kind == "distiller" and m not in OWN_TEST}


def _check_single(client, run, mode, terms):
    assert run.info.status == "FINISHED"
    assert run.data.params["mode"] == mode and run.data.tags["mode"] == mode
    for term in terms:
        assert f"loss_{term}" in run.data.metrics, term
    assert 0 <= run.data.metrics["test_acc"] <= 100


@pytest.mark.parametrize("mode", sorted(SINGLE))
def test_single_training_mode(mode, teacher_run, mlflow_server):
    extra, terms = SINGLE[mode]
    experiment = unique_experiment(mode)
    mlflow_run(mode, mlflow_server, experiment,  # smoke runs register only when named
               {**ONE_EPOCH, "teacher_checkpoint": teacher_run["checkpoint"], **extra,
                "registered_model": f"fashion_mnist-resnet8-{mode}"})
    client, runs = runs_of(mlflow_server, experiment)
    assert len(runs) == 1
    _check_single(client, runs[0], mode, terms)
    for name, value in extra.items():
        assert runs[0].data.params[name].lower() == str(value).lower(), name
    versions = client.search_model_versions(f"name='fashion_mnist-resnet8-{mode}'")
    version = next(v for v in versions if v.run_id == runs[0].info.run_id)
    # the registry says what the run says (nokd: tests/test_e2e_core.py)
    assert version.tags["teacher"] == runs[0].data.tags["teacher"] == "resnet8"
    assert version.tags["mode"] == mode and "from teacher resnet8" in version.description


def test_ab_has_two_phases(teacher_run, mlflow_server):
    experiment = unique_experiment("ab")
    mlflow_run("ab", mlflow_server, experiment,
               {**ONE_EPOCH, "epochs": 3, "ab_epochs": 1, "teacher_checkpoint": teacher_run["checkpoint"]})
    client, runs = runs_of(mlflow_server, experiment)
    run = runs[0]
    _check_single(client, run, "ab", ("ce", "kd"))
    ab_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_ab")]
    kd_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_kd")]
    assert ab_steps == [0] and sorted(kd_steps) == [1, 2]


def test_multikd_with_a_file_and_a_registry_uri(teacher_run, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    version = max(int(v.version) for v in client.search_model_versions("name='fashion_mnist-resnet8-teacher'"))
    ensemble = f"{teacher_run['checkpoint']},models:/fashion_mnist-resnet8-teacher/{version}"
    experiment = unique_experiment("multikd")
    mlflow_run("multikd", mlflow_server, experiment, {**ONE_EPOCH, "ensemble": ensemble,
                                                      "registered_model": "fashion_mnist-resnet8-multikd"})
    client, runs = runs_of(mlflow_server, experiment)
    _check_single(client, runs[0], "multikd", ("ce", "kd"))
    assert runs[0].data.tags["teacher"] == "resnet8+resnet8"
    (version,) = [v for v in client.search_model_versions("name='fashion_mnist-resnet8-multikd'")
                  if v.run_id == runs[0].info.run_id]
    assert version.tags["teacher"] == "resnet8+resnet8"


def _parent_and_children(client, runs):
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


@pytest.mark.parametrize("mode,extra,n_children", [
    ("kdparam", {"temperatures": "2,4", "alphas": "0.9"}, 2),
    ("takd", {"assistants": "resnet8"}, 2),
    ("allkd", {"teachers": "TEACHER,resnet8", "teacher_epochs": 1}, 3),
])
def test_multi_stage_mode(mode, extra, n_children, teacher_run, mlflow_server):
    extra = {k: (str(v).replace("TEACHER", str(teacher_run["checkpoint"]))) for k, v in extra.items()}
    if mode != "allkd":
        extra["teacher_checkpoint"] = teacher_run["checkpoint"]
    experiment = unique_experiment(mode)
    mlflow_run(mode, mlflow_server, experiment, {**ONE_EPOCH, **extra, "registered_model": f"fashion_mnist-resnet8-{mode}"})
    client, runs = runs_of(mlflow_server, experiment)
    parent, children = _parent_and_children(client, runs)
    assert parent.info.status == "FINISHED" and parent.data.params["mode"] == mode
    assert len(children) == n_children and all(c.info.status == "FINISHED" for c in children)
    kd_children = [c for c in children if c.data.tags["mode"] == "kd"]
    assert kd_children and all("loss_kd" in c.data.metrics for c in kd_children)
    selected = parent.data.tags["selected_run_id"]
    assert parent.data.metrics["test_acc"] == pytest.approx(
        next(c for c in children if c.info.run_id == selected).data.metrics["test_acc"])
    versions = client.search_model_versions(f"name='fashion_mnist-resnet8-{mode}'")
    assert versions, "the selected student is registered"
    # the version belongs to the strategy's run (its page lists it), its model is the
    # selected stage's, trained as a kd stage
    (version,) = [v for v in versions if v.run_id == parent.info.run_id]
    assert version.source == "models:/" + next(c for c in children if c.info.run_id == selected).outputs.model_outputs[0].model_id
    assert version.tags["mode"] == mode and version.tags["stage_mode"] == "kd"
    assert f"mode `{mode}`" in version.description and parent.info.run_id in version.description
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}


def test_a_renamed_parameter_through_mlflow_run_names_the_new_one(mlflow_server):
    """`-P beta=10` on pkd (the name before pkd_weight): MLflow passes the undeclared
    parameter on, and the run stops at once with the new name, not a usage screen."""
    proc = mlflow_run("pkd", mlflow_server, unique_experiment("renamed"), {**ONE_EPOCH, "beta": 10}, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: mode pkd has no parameter beta (beta is now pkd_weight); pass pkd_weight instead"], \
        proc.stderr[-2000:]
