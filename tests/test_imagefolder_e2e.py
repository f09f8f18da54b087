"""End to end on an image folder the test makes: kd through `mlflow run . -e kd` from a
torchvision teacher given as a plain state dict, nokd (in memory) and a feature mode (sfd,
streamed) through `mlflow run` too, each against a real MLflow store; the registered student
answers class names for raw images through pyfunc."""

from __future__ import annotations

import pytest
import torch

from conftest import mlflow_run, runs_of, sqlite_store
from imagefolder_fixture import CLASSES, make_image_folder

pytestmark = pytest.mark.e2e

# A torchvision teacher at the defaults on 900 generated digits: 115 of 200 test images at
# AdamW 0.001 (optimizer=auto), 20 (one class) at SGD 0.1, measured on the AVX-512 Xeon.
GLYPH_MIN_CORRECT = 70

SMALL = {"dataset": "imagefolder", "image_size": 32, "val_size": 25, "batch_size": 25, "epochs": 2, "lr": 0.02,
         "device": "cpu", "precision": "fp32", "system_metrics": "false"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train_per_class=30, test_per_class=6)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """torchvision's own resnet18 with a 5-class head, saved as torchvision saves weights."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet18-5.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), path)
    return path


def test_kd_through_mlflow_run(folder, teacher_file, tmp_path, own_tracking_uri):
    from mlflow import MlflowClient
    import mlflow.pyfunc

    store = sqlite_store(tmp_path)
    params = {**SMALL, "data_dir": folder, "student": "tv-mobilenet_v3_small",
              "teacher": "torchvision:resnet18", "teacher_checkpoint": teacher_file, "registered_model": "fruit-kd"}
    proc = mlflow_run("kd", store, "imagefolder-e2e", params)
    assert "skipping unreadable image" in proc.stderr and "broken.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr
    client, runs = runs_of(store, "imagefolder-e2e")
    run = runs[-1]
    assert run.info.status == "FINISHED"
    p, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert p["student"] == "tv-mobilenet_v3_small" and p["image_size"] == "32" and tags["student"] == p["student"]
    assert p["teacher"] == tags["teacher"] == "torchvision:resnet18" and tags["class_names"] == ",".join(CLASSES)
    assert "is ignored" not in proc.stderr  # the runner's note when a checkpoint is another architecture
    assert metrics["skipped_images"] == 1 and 0 <= metrics["test_acc"] <= 100
    assert {h.step for h in client.get_metric_history(run.info.run_id, "loss_kd")} == {0, 1}
    version = next(v for v in client.search_model_versions("name='fruit-kd'") if v.run_id == run.info.run_id)
    assert version.tags["class_names"] == ",".join(CLASSES)
    own_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/fruit-kd/{version.version}")
    card = model.metadata.metadata["kd_mlflow"]
    assert card["class_names"] == list(CLASSES) and card["input"]["height"] == 32
    assert card["normalization"]["mean"] == [0.485, 0.456, 0.406]
    from kd_mlflow.data import load_data
    from kd_mlflow.config import Config

    data = load_data(Config.for_mode("kd", dataset="imagefolder", data_dir=str(folder), image_size=32,
                                     val_size=25))
    answer = model.predict(data.test.x[:8].numpy())
    assert len(answer) == 8 and set(answer["label"]) <= set(CLASSES)
    assert int(metrics["test_images"]) == len(data.test)
    # raw images as they are on disk, any size: the model resizes and crops them itself
    import numpy as np
    from PIL import Image

    assert card["resize"] == {"short_side": 37, "crop": 32}
    for path in sorted((folder / "test" / "banana").iterdir())[:3]:
        with Image.open(path) as img:
            raw = np.asarray(img.convert("RGB")).transpose(2, 0, 1)[None].copy()
        assert raw.shape[-2:] != (32, 32)
        assert model.predict(raw)["label"][0] in CLASSES
    # served = logged, as counts of correct images, for files at the model's image_size (32),
    # larger (48) and smaller (20): the run's evaluation decodes each file (imagefolder.decode:
    # resize to 37, centre crop 32), the served model gets the file's pixels as they are
    import mlflow.pytorch

    from pathlib import Path

    import mlflow.artifacts

    from kd_mlflow.data.imagefolder import decode
    from kd_mlflow.tracking.pyfunc_images import ImageClassifier

    network = mlflow.pytorch.load_model(f"models:/fruit-kd/{version.version}")  # exported: in inference mode
    served_model = ImageClassifier(Path(mlflow.artifacts.download_artifacts(f"models:/fruit-kd/{version.version}")))
    mean = torch.tensor(card["normalization"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["normalization"]["std"]).view(1, 3, 1, 1)
    originals = [(path, CLASSES.index(path.parent.name)) for path in sorted((folder / "test").glob("*/*"))
                 if path.name != "broken.jpg"]
    for size in (32, 48, 20):
        files, labels = [], []
        for i, (path, label) in enumerate(originals):
            with Image.open(path) as img:
                resized = img.convert("RGB").resize((size, size), Image.BILINEAR)
            files.append(tmp_path / f"{size}-{i}.png")
            resized.save(files[-1])
            labels.append(label)
        with torch.no_grad():
            logged = torch.from_numpy(np.stack([decode(f, 32) for f in files]))
            logged_p, logged_pred = torch.softmax(network((logged.float() / 255 - mean) / std), dim=1).max(dim=1)
            logged_pred = logged_pred.tolist()
        channels_last = np.stack([np.asarray(Image.open(f)) for f in files])  # N x H x W x 3, as PIL gives
        raw = channels_last.transpose(0, 3, 1, 2)
        # the pixels the served network sees are the ones evaluation decoded, exactly
        assert torch.equal(served_model.pixels(raw), logged), size
        assert torch.equal(served_model.pixels(channels_last), logged), size
        answer = model.predict(raw)
        served = answer["class_index"].tolist()
        # the same pixels in, so the same probabilities out (not only the same arg max)
        assert np.allclose(answer["probability"].to_numpy(), logged_p.double().numpy(), rtol=1e-5, atol=0), size
        correct = lambda pred: sum(int(p == y) for p, y in zip(pred, labels))  # noqa: E731
        assert correct(served) == correct(logged_pred), size
        assert served == logged_pred, size
    # the files as they are (24-48 px, grayscale, RGB, RGBA, palette made RGBA), one image per
    # row of a DataFrame: each resized as evaluation decoded it
    import pandas as pd

    def as_array(path):
        with Image.open(path) as img:
            return np.asarray(img.convert("RGBA") if img.mode == "P" else img)

    frame = pd.DataFrame({"image": [as_array(path) for path, _ in originals]})
    assert {a.ndim for a in frame["image"]} == {2, 3} and len({a.shape for a in frame["image"]}) > 1
    assert torch.equal(served_model.pixels(frame), torch.from_numpy(np.stack([decode(p, 32) for p, _ in originals])))


@pytest.mark.parametrize("mode,loading", [("nokd", "memory"), ("sfd", "stream")])
def test_nokd_and_a_feature_mode_through_mlflow_run(mode, loading, folder, teacher_file, tmp_path):
    store = sqlite_store(tmp_path)
    params = {**SMALL, "data_dir": folder, "student": "tv-resnet18", "teacher": "tv-resnet18",
              "teacher_checkpoint": teacher_file, "data_loading": loading}
    proc = mlflow_run(mode, store, f"if-{mode}", params)
    assert "Traceback" not in proc.stderr
    client, runs = runs_of(store, f"if-{mode}")
    r = runs[-1]
    assert r.info.status == "FINISHED" and r.data.metrics["skipped_images"] == 1
    terms = {"nokd": {"ce"}, "sfd": {"ce", "sfd"}}[mode]
    assert {k[len("loss_"):] for k in r.data.metrics if k.startswith("loss_")} == terms
    assert r.data.tags["class_names"] == ",".join(CLASSES)
    assert r.data.metrics["test_images"] == 30 and r.data.params["data_loading"] == loading


def test_a_teacher_trained_on_the_folder_teaches(folder, tmp_path, monkeypatch, own_tracking_uri):
    """The teacher entry point on an image folder writes a checkpoint that kd loads."""
    import mlflow

    from kd_mlflow.config import Config
    from kd_mlflow.runner import run
    from kd_mlflow.teachers import load_teacher

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path))
    own_tracking_uri(sqlite_store(tmp_path))
    out = tmp_path / "fruit-resnet8.pt"
    values = {**SMALL, "system_metrics": False, "data_dir": str(folder), "epochs": 1}
    result = run(Config.for_mode("teacher", arch="resnet8", output=str(out), experiment="if-teacher", **values))
    kd = Config.for_mode("kd", student="tv-resnet18", teacher_checkpoint=str(out), **values)
    model, meta = load_teacher(str(out), kd)
    assert meta["arch"] == "resnet8" and meta["dataset"] == "imagefolder" and meta["num_classes"] == 5
    assert meta["test_acc"] == result.test_acc


def test_a_torchvision_teacher_trains_on_a_small_folder_at_the_defaults(tmp_path, monkeypatch, own_tracking_uri):
    """A user's own small folder (10 classes of generated digits, 900 training images at
    32 px) and a torchvision teacher at the defaults (10 epochs, optimizer and learning
    rate left alone): optimizer=auto gives the tv family AdamW at 0.001. SGD at 0.1, the
    CIFAR recipe, stays at one class here (and diverged on scikit-learn's digits)."""
    from imagefolder_fixture import make_glyph_folder

    from kd_mlflow.config import Config
    from kd_mlflow.runner import run

    folder = make_glyph_folder(tmp_path / "glyphs", train_per_class=100, test_per_class=20)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path))
    own_tracking_uri(sqlite_store(tmp_path))
    cfg = Config.for_mode("teacher", arch="tv-resnet18", dataset="imagefolder", data_dir=str(folder), image_size=32,
                          val_size=100, device="cpu", system_metrics=False, experiment="glyphs",
                          output=str(tmp_path / "glyphs-tv-resnet18.pt"))
    assert (cfg.optimizer, cfg.lr) == ("auto", 0.0) and (cfg.optimizer_used, cfg.lr_used) == ("adamw", 0.001)
    result = run(cfg)
    import mlflow

    run_data = mlflow.MlflowClient().get_run(result.run_id).data
    assert (run_data.params["optimizer"], run_data.params["lr"]) == ("auto", "0.0")  # as asked
    assert (run_data.tags["optimizer"], run_data.tags["lr"]) == ("adamw", "0.001")  # what ran
    # chance is 20 of 200; a diverged network answers one class (20)
    assert result.test_images == 200 and result.test_correct >= GLYPH_MIN_CORRECT, result.test_correct
