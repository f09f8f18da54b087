"""teacher_finetune_epochs: a torchvision teacher whose checkpoint has another number of
classes gets a new classifier trained on its frozen network, in a nested run, before
distillation."""

from __future__ import annotations

import pytest
import torch

from conftest import sqlite_store
from imagefolder_fixture import make_image_folder
from kd_mlflow.config import Config, ConfigError
from kd_mlflow.teachers import finetune_heads, load_teacher

pytestmark = pytest.mark.e2e

SMALL = {"dataset": "imagefolder", "image_size": 32, "val_size": 25, "batch_size": 25, "epochs": 1, "lr": 0.05,
         "device": "cpu", "precision": "fp32", "system_metrics": False, "student": "resnet8",
         "teacher": "torchvision:resnet18"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torchvision

    tmp = tmp_path_factory.mktemp("finetune")
    folder = make_image_folder(tmp / "images", train_per_class=20, test_per_class=4, corrupt=False)
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(weights=None)  # a 1000-class head, as torchvision publishes
    torch.save(imagenet.state_dict(), tmp / "resnet18-imagenet.pth")
    return folder, tmp / "resnet18-imagenet.pth", imagenet.state_dict()


def test_the_head_trains_and_nothing_else_moves(setup):
    from kd_mlflow.data import load_data
    from kd_mlflow.runner import runtime_for
    from kd_mlflow.tracking import NullTracker

    folder, ckpt, original = setup
    cfg = Config.for_mode("kd", data_dir=str(folder), teacher_checkpoint=str(ckpt), **SMALL)
    with pytest.raises(ConfigError, match="1000-class classifier.*teacher_finetune_epochs=N"):
        load_teacher(str(ckpt), cfg)
    cfg = cfg.replace(teacher_finetune_epochs=2).validate()
    model, meta = load_teacher(str(ckpt), cfg)
    assert meta["finetune_head_from"] == 1000 and model.classifier.out_features == 5
    (teacher,), (meta,) = finetune_heads(cfg, [model], [meta], load_data(cfg), NullTracker(), runtime_for(cfg))
    state = teacher.net.state_dict()
    for k, v in original.items():
        if not k.startswith("fc."):
            assert torch.equal(state[k], v), k  # weights and BatchNorm statistics untouched
    assert "finetune_head_from" not in meta and 0 <= meta["test_acc"] <= 100
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_a_nested_run_before_distillation(setup, tmp_path, monkeypatch, own_tracking_uri):
    import mlflow

    from kd_mlflow.runner import run

    folder, ckpt, _ = setup
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path))
    own_tracking_uri(sqlite_store(tmp_path))
    result = run(Config.for_mode("kd", data_dir=str(folder), teacher_checkpoint=str(ckpt), teacher_finetune_epochs=1,
                                 experiment="finetune", **SMALL))
    client = mlflow.MlflowClient()
    parent = client.get_run(result.run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.info.run_name == "teacher-finetune-tv-resnet18" and child.info.status == "FINISHED"
    assert child.data.params["classes_in_checkpoint"] == "1000" and "val_acc" in child.data.metrics
    assert parent.data.metrics["teacher_test_acc"] == child.data.metrics["test_acc"]
    assert parent.data.params["teacher_finetune_epochs"] == "1" and parent.info.status == "FINISHED"
    for tag in ("code_version", "torch_version", "cpu_kind", "precision", "threads", "device"):
        assert child.data.tags[tag] == parent.data.tags[tag], tag  # what its numbers depend on
