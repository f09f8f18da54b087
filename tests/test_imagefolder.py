"""dataset=imagefolder: the layout, the splits, the corrupt-image policy, the training
augmentation, and the built-in datasets left as they were."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from imagefolder_fixture import CLASSES, CORRUPT, make_image_folder
from kd_mlflow.config import Config, ConfigError
from kd_mlflow.data import DeviceBatches, class_names, dataset_info, load_data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train_per_class=40, test_per_class=8)


def cfg_for(root, **kw) -> Config:
    values = {"dataset": "imagefolder", "data_dir": str(root), "image_size": 32, "val_size": 20,
              "device": "cpu", "student": "tv-resnet18", "teacher": "tv-resnet18", **kw}
    return Config.for_mode("nokd", **values).validate()


def test_splits_classes_and_skipped_corrupt_image(folder, capsys):
    data = load_data(cfg_for(folder))
    err = capsys.readouterr().err
    # one line, naming the file; no traceback
    lines = [line for line in err.splitlines() if "broken.jpg" in line]
    assert len(lines) == 1 and str(folder / CORRUPT) in lines[0] and "Traceback" not in err
    assert data.info.class_names == CLASSES and data.info.num_classes == 5
    assert data.info.skipped_images == 1
    # 201 training files, one corrupt: 20 carved for validation, the corrupt one dropped
    assert len(data.val) + len(data.train) == 200 and len(data.test) == 40
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.uint8 and tuple(split.x.shape[1:]) == (3, 32, 32)  # gray/RGBA/P -> RGB
    assert sorted(data.test.y.unique().tolist()) == [0, 1, 2, 3, 4]
    assert data.info.mean == (0.485, 0.456, 0.406) and data.info.std == (0.229, 0.224, 0.225)
    assert class_names("imagefolder", str(folder)) == list(CLASSES)
    # the run's Datasets: the train split's indices exclude the unreadable file
    datasets = {d["context"]: d for d in data.datasets()}
    assert datasets["train"]["rows"] == len(data.train) and datasets["test"]["image"] == "uint8 3x32x32"
    # same seed, same split; another seed, another
    again = load_data(cfg_for(folder))
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.val.y, data.val.y)
    other = load_data(cfg_for(folder, seed=1))
    assert not torch.equal(other.val.x, data.val.x)


def test_corrupt_images_stop_names_the_file(folder):
    with pytest.raises(ConfigError, match=r"cannot read image .*broken\.jpg.*corrupt_images=skip"):
        load_data(cfg_for(folder, corrupt_images="stop"))


def test_val_folder_mean_std_and_image_size(tmp_path):
    root = make_image_folder(tmp_path, train_per_class=6, test_per_class=2, val_per_class=3, corrupt=False)
    cfg = cfg_for(root, val_size=5000, image_size=20, mean="0.5", std="0.25,0.25,0.5")
    data = load_data(cfg)
    assert len(data.val) == 15 and len(data.train) == 30  # val/ used whole; val_size does not apply
    assert data.val_file == "val" and {d["context"]: d for d in data.datasets()}["validation"]["file"] == "val"
    assert data.info.image_size == 20 and data.train.x.shape[-1] == 20
    assert data.info.mean == (0.5, 0.5, 0.5) and data.info.std == (0.25, 0.25, 0.5)
    assert dataset_info(cfg).num_classes == 5
    assert dataset_info(cfg_for(root, image_size=0)).image_size == 224  # the default for image folders


def test_layout_errors_come_before_any_decoding(tmp_path, folder):
    with pytest.raises(ConfigError, match="needs -P data_dir"):
        cfg_for("")
    with pytest.raises(ConfigError, match="no test/ folder"):
        (tmp_path / "a" / "train" / "x").mkdir(parents=True)
        cfg_for(tmp_path / "a")
    bad = tmp_path / "b"
    shutil.copytree(folder, bad)
    (bad / "test" / "durian").mkdir()
    with pytest.raises(ConfigError, match="durian"):
        cfg_for(bad)
    with pytest.raises(ConfigError, match="image_size must be >= 16"):
        cfg_for(folder, image_size=8)
    with pytest.raises(ConfigError, match="mean=.*1 or 3"):
        cfg_for(folder, mean="0.1,0.2")
    with pytest.raises(ConfigError, match="unknown corrupt_images"):
        cfg_for(folder, corrupt_images="ignore")


def test_builtin_datasets_refuse_image_parameters():
    for name, value in (("image_size", 64), ("mean", "0.5"), ("std", "0.5")):
        with pytest.raises(ConfigError, match=f"{name} applies to dataset=imagefolder only"):
            Config.for_mode("nokd", dataset="cifar10", **{name: value}).validate()
    with pytest.raises(ConfigError, match="3-channel"):
        Config.for_mode("nokd", dataset="fashion_mnist", student="tv-resnet18").validate()


def test_random_resized_crop_is_seeded_and_sharded(folder):
    data = load_data(cfg_for(folder, corrupt_images="skip"))

    def first(seed, rank=0, world=1):
        b = DeviceBatches(data.train, data.info, 16, device="cpu", shuffle=True, augment=True, seed=seed,
                          channels_last=False, rank=rank, world_size=world)
        return next(iter(b))

    x0, y0 = first(0)
    x1, _ = first(0)
    assert torch.equal(x0, x1) and x0.shape == (16, 3, 32, 32)
    assert not torch.equal(x0, first(1)[0])
    # crops differ from the stored images (zoomed), values stay in range after normalisation
    plain = DeviceBatches(data.train, data.info, 16, device="cpu", shuffle=False, augment=False,
                          channels_last=False)
    lo = (0 - max(data.info.mean)) / min(data.info.std) - 1e-4
    hi = (1 - min(data.info.mean)) / min(data.info.std) + 1e-4
    assert lo <= float(x0.min()) and float(x0.max()) <= hi
    assert not torch.equal(next(iter(plain))[0], x0)
    # two ranks' shards of a global batch are the one-process batch
    a, b = first(0, 0, 2), first(0, 1, 2)
    assert torch.allclose(torch.cat([a[0], b[0]]), x0) and torch.equal(torch.cat([a[1], b[1]]), y0)


def test_fits_rule_refuses_what_does_not_fit(folder, monkeypatch):
    import kd_mlflow.data.imagefolder as imagefolder

    monkeypatch.setattr(imagefolder, "MEMORY_FRACTION", 1e-9)
    with pytest.raises(ConfigError, match=r"GiB decoded.*lower -P image_size"):
        load_data(cfg_for(folder, data_loading="memory"))
    assert type(load_data(cfg_for(folder)).train.x).__name__ == "FolderImages"  # auto: streamed
    assert np.isclose(imagefolder.CENTER_CROP_FRACTION, 0.875)
