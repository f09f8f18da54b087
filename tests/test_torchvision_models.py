"""torchvision architectures (tv-<name>) as students and teachers: stage features through
hooks, teachers from plain state dicts, every distillation loss on a torchvision pair."""

from __future__ import annotations

import pytest
import torch

from imagefolder_fixture import make_image_folder
from kd_mlflow.config import Config, ConfigError
from kd_mlflow.models import create_model, is_known_architecture
from kd_mlflow.modes import MODES
from kd_mlflow.teachers import load_teacher


def test_names_and_alias():
    assert is_known_architecture("tv-resnet50") and is_known_architecture("torchvision:mobilenet_v3_small")
    assert not is_known_architecture("tv-no_such_net") and not is_known_architecture("tv-fasterrcnn_resnet50_fpn")
    Config.for_mode("kd", dataset="cifar10", student="tv-resnet18", teacher="torchvision:resnet50").validate()
    # the trained network's name goes into MLflow model names, which refuse ':'
    with pytest.raises(ConfigError, match="student=torchvision:resnet18: write student=tv-resnet18"):
        Config.for_mode("kd", dataset="cifar10", student="torchvision:resnet18").validate()
    with pytest.raises(ConfigError, match="write arch=tv-resnet18"):
        Config.for_mode("teacher", dataset="cifar10", arch="torchvision:resnet18").validate()
    with pytest.raises(ConfigError, match="unknown student architecture 'tv-nope'"):
        Config.for_mode("nokd", dataset="cifar10", student="tv-nope").validate()


@pytest.mark.parametrize("arch", ["tv-resnet18", "tv-mobilenet_v3_small", "tv-efficientnet_b0"])
def test_stage_features_by_hooks(arch):
    torch.manual_seed(0)
    model = create_model(arch, 5, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    f = model.features(x)
    assert torch.equal(f.logits, model(x))  # the hooks change nothing
    assert len(f.stages) == len(model.stage_channels) == 4
    assert [s.shape[1] for s in f.stages] == model.stage_channels
    sides = [s.shape[-1] for s in f.stages]
    assert sides == sorted(sides, reverse=True) and len(set(sides)) == 4  # shallow to deep, one per resolution
    assert f.embedding.shape == (2, model.embedding_dim)
    assert len(model.bn_before_relu()) == 4
    assert all(k.startswith("net.") for k in model.state_dict())  # torchvision's keys under net.


def test_resnet_stage_is_the_pre_relu_sum():
    model = create_model("tv-resnet18", 5, 3).eval()
    with torch.no_grad():
        f = model.features(torch.randn(2, 3, 32, 32))
    assert all(float(s.min()) < 0 for s in f.stages)  # before the block's last ReLU


def _teacher_cfg(root, ckpt, **kw):
    return Config.for_mode("kd", dataset="imagefolder", data_dir=str(root), image_size=32, student="tv-resnet18",
                           teacher="torchvision:resnet18", teacher_checkpoint=str(ckpt), **kw)


def test_teacher_from_plain_state_dict(tmp_path):
    import torchvision

    root = make_image_folder(tmp_path / "data", train_per_class=3, test_per_class=1, corrupt=False)
    net = torchvision.models.resnet18(weights=None, num_classes=5)
    torch.save(net.state_dict(), tmp_path / "five.pth")
    model, meta = load_teacher(str(tmp_path / "five.pth"), _teacher_cfg(root, tmp_path / "five.pth"))
    assert meta["arch"] == "torchvision:resnet18" and meta["num_classes"] == 5  # the teacher as typed
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), net.eval()(x))
    # ImageNet's 1000-class head on a 5-class folder: one clear line
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(ConfigError, match=r"1000-class classifier \(fc.weight 1000x512\).*has 5 classes"):
        load_teacher(str(tmp_path / "imagenet.pth"), _teacher_cfg(root, tmp_path / "imagenet.pth"))
    # another architecture's weights
    with pytest.raises(ConfigError, match="does not load as torchvision's resnet18"):
        torch.save(torchvision.models.resnet34(weights=None, num_classes=5).state_dict(), tmp_path / "r34.pth")
        load_teacher(str(tmp_path / "r34.pth"), _teacher_cfg(root, tmp_path / "r34.pth"))


@pytest.mark.parametrize("mode", ["kd", "pkd", "sfd", "ab", "oh", "rkd", "dkd", "dist", "triplet"])
def test_every_loss_trains_a_torchvision_pair(mode):
    torch.manual_seed(0)
    teacher, student = create_model("tv-resnet34", 5, 3), create_model("tv-mobilenet_v3_small", 5, 3)
    cfg = Config.for_mode(mode, dataset="imagefolder", student="tv-mobilenet_v3_small", teacher="tv-resnet34",
                          epochs=20)
    distiller = MODES[mode].load()(student, [teacher], cfg)
    distiller.train()
    distiller.on_epoch_start(0)
    logits, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss = sum(losses.values())
    assert logits.shape == (4, 5) and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_an_image_folder_teacher_is_always_a_file(tmp_path):
    from kd_mlflow.teachers import teacher_source

    root = make_image_folder(tmp_path / "data", train_per_class=3, test_per_class=1, corrupt=False)
    cfg = Config.for_mode("kd", dataset="imagefolder", data_dir=str(root), teacher="tv-resnet50")
    with pytest.raises(ConfigError, match="needs the teacher's file: pass -P teacher_checkpoint"):
        teacher_source(cfg)
    assert teacher_source(cfg.replace(teacher_checkpoint="t.pth")) == "t.pth"
    with pytest.raises(ConfigError, match="needs -P output=FILE"):
        Config.for_mode("teacher", dataset="imagefolder", data_dir=str(root), arch="tv-resnet18").validate()
    Config.for_mode("teacher", dataset="imagefolder", data_dir=str(root), arch="tv-resnet18",
                    output=str(tmp_path / "t.pt")).validate()
