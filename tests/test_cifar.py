"""CIFAR-10/100 from the authors' binary distribution, on the real code path, without the
network: small datasets written here in exactly the published layout (fixed-size records,
one label byte (CIFAR-10) or coarse + fine label bytes (CIFAR-100), then 3072 pixel bytes as
R, G and B planes of 32x32), read back by the loader, trained on through `mlflow run` and
the CLI, and damaged to check that a bad file is one clean line naming it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import mlflow_run, runs_of, unique_experiment
from kd_mlflow import data
from kd_mlflow.checkpoint import save_model_checkpoint
from kd_mlflow.config import Config, ConfigError
from kd_mlflow.models import create_model
from test_bad_input import assert_clean_error, invoke, no_runs_created, workdir  # noqa: F401 (fixture)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_PER_FILE, TEST_RECORDS = 60, 100  # the real files hold 10000 records each
CIFAR100_TRAIN = 300
TINY = {"train_subset": 200, "val_size": 50, "test_subset": 100, "batch_size": 50, "epochs": 1,
        "student": "resnet8", "precision": "fp32", "device": "cpu"}
TINY_ARGS = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def known_record(label_bytes: bytes) -> bytes:
    """A record built byte by byte from the published description: R plane all 11, G plane
    = row index, B plane = column index, each plane row-major."""
    red = bytes([11]) * 1024
    green = bytes(row for row in range(32) for _ in range(32))
    blue = bytes(col for _ in range(32) for col in range(32))
    return label_bytes + red + green + blue


def random_records(rng, n: int, label_values: tuple) -> tuple[bytes, np.ndarray, np.ndarray]:
    """-> (file bytes, pixels N x 3072, class labels): the last label byte is the class."""
    labels = np.stack([rng.integers(0, v, n) for v in label_values], axis=1).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1).tobytes(), pixels, labels[:, -1].astype(np.int64)


def write_cifar10(root: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        raw, x, y = random_records(rng, TRAIN_PER_FILE, (10,))
        if i == 2:  # the known record goes first in the second file: global index TRAIN_PER_FILE
            raw = known_record(bytes([7])) + raw[3073:]
            x[0], y[0] = np.frombuffer(known_record(b""), np.uint8), 7
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        train_x.append(x), train_y.append(y)
    raw, test_x, test_y = random_records(rng, TEST_RECORDS, (10,))
    (folder / "test_batch.bin").write_bytes(raw)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")  # as shipped: blank tail
    return {"train_x": np.concatenate(train_x), "train_y": np.concatenate(train_y),
            "test_x": test_x, "test_y": test_y}


def write_cifar100(root: Path, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    raw, train_x, train_y = random_records(rng, CIFAR100_TRAIN, (20, 100))
    raw = known_record(bytes([19, 99])) + raw[3074:]  # coarse 19, fine 99: the fine one is the class
    train_x[0], train_y[0] = np.frombuffer(known_record(b""), np.uint8), 99
    (folder / "train.bin").write_bytes(raw)
    raw, test_x, test_y = random_records(rng, TEST_RECORDS, (20, 100))
    (folder / "test.bin").write_bytes(raw)
    (folder / "fine_label_names.txt").write_text("".join(f"class_{i}\n" for i in range(100)))
    (folder / "coarse_label_names.txt").write_text("".join(f"super_{i}\n" for i in range(20)))
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    return root, write_cifar10(root)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    return root, write_cifar100(root)


def damaged_copy(src: Path, dst: Path, name: str, size_change: int) -> Path:
    """``src``'s CIFAR-10 folder copied under ``dst`` with file ``name`` cut by ``size_change`` bytes."""
    folder = dst / "cifar-10-batches-bin"
    shutil.copytree(src / "cifar-10-batches-bin", folder)
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes(raw[:len(raw) - size_change])
    return folder / name


def assert_arrays(loaded, expected: dict) -> None:
    train_x, train_y, test_x, test_y = loaded
    assert train_x.dtype == np.uint8 and train_x.shape == (len(expected["train_y"]), 3, 32, 32)
    assert np.array_equal(train_x.reshape(len(train_x), -1), expected["train_x"])
    assert np.array_equal(train_y, expected["train_y"])
    assert np.array_equal(test_x.reshape(len(test_x), -1), expected["test_x"])
    assert np.array_equal(test_y, expected["test_y"])


def assert_known_record(image: np.ndarray) -> None:
    """CHW: channel 0 is the R plane, then G, then B; each plane row-major."""
    assert (image[0] == 11).all()
    assert (image[1] == np.arange(32)[:, None]).all()
    assert (image[2] == np.arange(32)[None, :]).all()


# ------------------------------------------------------------------ the loader
def test_cifar10_records_read_back_exactly(cifar10, monkeypatch):
    root, expected = cifar10
    loaded = data.load_arrays("cifar10", str(root))
    assert_arrays(loaded, expected)
    assert loaded[1][TRAIN_PER_FILE] == 7
    assert_known_record(loaded[0][TRAIN_PER_FILE])
    assert data.cifar_class_names("cifar10", str(root)) == CIFAR10_NAMES
    # data_dir may also name the extracted folder itself
    assert_arrays(data.load_arrays("cifar10", str(root / "cifar-10-batches-bin")), expected)
    # $KD_DATA_DIR when -P data_dir is empty, through the splits every mode trains on
    monkeypatch.setenv("KD_DATA_DIR", str(root))
    bundle = data.load_data(Config(dataset="cifar10", train_subset=0, val_size=50, test_subset=0).validate())
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (5 * TRAIN_PER_FILE - 50, 50, TEST_RECORDS)
    assert bundle.train.x.shape[1:] == (3, 32, 32)


def test_cifar100_uses_the_fine_label(cifar100):
    root, expected = cifar100
    loaded = data.load_arrays("cifar100", str(root))
    assert_arrays(loaded, expected)
    assert loaded[1][0] == 99 and loaded[1].max() < 100
    assert_known_record(loaded[0][0])
    assert data.cifar_class_names("cifar100", str(root)) == [f"class_{i}" for i in range(100)]


def one_line_error(call, *needles) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.mark.parametrize("name,cut,needle", [
    ("data_batch_3.bin", 1000, "not a whole number of 3073-byte records"),  # cut mid-record
    ("data_batch_3.bin", 3073, "59 records where data_batch_1.bin has 60"),  # cut at a record boundary
    ("test_batch.bin", 3073 * TEST_RECORDS, "0 bytes"),  # emptied
])
def test_cifar10_truncated_file_is_one_line_naming_it(cifar10, tmp_path, name, cut, needle):
    path = damaged_copy(cifar10[0], tmp_path, name, cut)
    one_line_error(lambda: data.load_arrays("cifar10", str(tmp_path)), str(path), needle)


def test_label_out_of_range_is_one_line(cifar10, cifar100, tmp_path):
    path = damaged_copy(cifar10[0], tmp_path / "c10", "data_batch_4.bin", 0)
    raw = bytearray(path.read_bytes())
    raw[5 * 3073] = 10  # the label byte of record 5
    path.write_bytes(bytes(raw))
    one_line_error(lambda: data.load_arrays("cifar10", str(tmp_path / "c10")), str(path), "record 5 has label 10")

    folder = tmp_path / "c100" / "cifar-100-binary"
    shutil.copytree(cifar100[0] / "cifar-100-binary", folder)
    raw = bytearray((folder / "test.bin").read_bytes())
    raw[3 * 3074 + 1] = 100  # the fine label byte of record 3
    (folder / "test.bin").write_bytes(bytes(raw))
    one_line_error(lambda: data.load_arrays("cifar100", str(tmp_path / "c100")),
                   str(folder / "test.bin"), "record 3 has fine label 100, outside 0..99")


# ------------------------------------------------------------------ the download
def tar_gz(path: Path, members: dict) -> Path:
    """A .tar.gz whose members are {name: bytes, or ("symlink", target)}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def serve_archive(monkeypatch, archive: Path, md5: str | None = None) -> None:
    """Point the CIFAR-10 download at ``archive`` (file://), published md5 ``md5`` if given."""
    layout = data.CIFAR_LAYOUTS["cifar10"]
    changes = {"url": archive.as_uri(), **({"md5": md5} if md5 else {})}
    monkeypatch.setitem(data.CIFAR_LAYOUTS, "cifar10", dataclasses.replace(layout, **changes))


def test_download_checks_the_md5_then_extracts_only_the_known_files(cifar10, tmp_path, monkeypatch):
    folder = cifar10[0] / "cifar-10-batches-bin"
    members = {f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}
    members.update({"../escaped.bin": b"x", f"{tmp_path}/absolute.bin": b"x",
                    "cifar-10-batches-bin/../../escaped2.bin": b"x",
                    "cifar-10-batches-bin/readme.html": ("symlink", "/etc/passwd")})
    (tmp_path / "served").mkdir()
    archive = tar_gz(tmp_path / "served" / "cifar-10-binary.tar.gz", members)

    # the published md5 is the official archive's: this one is rejected, in one line, and deleted
    serve_archive(monkeypatch, archive)
    target = tmp_path / "data"
    one_line_error(lambda: data.load_arrays("cifar10", str(target)),
                   "has md5 " + hashlib.md5(archive.read_bytes()).hexdigest(),
                   "not the published c32a1d4ab5d03f1284b67883e8d87530")
    assert list(target.iterdir()) == []

    # the same archive as if it were the published one: only the six known files come out
    serve_archive(monkeypatch, archive, md5=hashlib.md5(archive.read_bytes()).hexdigest())
    data.load_arrays("cifar10", str(target))  # downloads, checks, extracts, reads
    extracted = sorted(p.name for p in (target / "cifar-10-batches-bin").iterdir())
    assert extracted == sorted(p.name for p in folder.iterdir())
    assert [p.name for p in target.iterdir()] == ["cifar-10-batches-bin"]  # and the archive is gone
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "escaped2.bin").exists()
    assert not (tmp_path / "absolute.bin").exists()
    assert_arrays(data.load_arrays("cifar10", str(target)), cifar10[1])


def test_wrong_md5_through_the_cli_is_one_line_and_no_run(workdir, monkeypatch):  # noqa: F811
    archive = tar_gz(workdir / "cifar-10-binary.tar.gz", {"cifar-10-batches-bin/test_batch.bin": b"0" * 3073})
    serve_archive(monkeypatch, archive)
    result = invoke(["train", "nokd", "--dataset", "cifar10", "--data-dir", str(workdir / "data"), *TINY_ARGS])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and " INFO mlflow" not in line]
    # the line saying a download started, then the one error line
    assert len(lines) == 2 and lines[0].startswith(f"downloading {archive.as_uri()}"), result.output
    assert lines[1].startswith("error: the cifar10 archive from ") and "has md5 " in lines[1], result.output
    assert "not the published c32a1d4ab5d03f1284b67883e8d87530" in lines[1]
    assert no_runs_created(workdir)


def test_cli_truncated_batch_is_exit_2_naming_the_file(cifar10, workdir):  # noqa: F811
    path = damaged_copy(cifar10[0], workdir / "data", "data_batch_3.bin", 500)
    result = invoke(["train", "nokd", "--dataset", "cifar10", "--data-dir", str(workdir / "data"), *TINY_ARGS])
    assert_clean_error(result, str(path), "is truncated")
    assert no_runs_created(workdir)


# ------------------------------------------------------------------ training on it
def test_cifar100_trains_through_the_cli(cifar100, workdir):  # noqa: F811
    result = invoke(["train", "nokd", "--dataset", "cifar100", "--data-dir", str(cifar100[0]),
                     "--registered-model", "cifar100-cli", *TINY_ARGS])
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["dataset"] == "cifar100"
    assert 0 <= run.data.metrics["test_acc"] <= 100


@pytest.mark.e2e
@pytest.mark.parametrize("mode,terms", [("nokd", ("ce",)), ("kd", ("ce", "kd"))])
def test_cifar10_through_mlflow_run(mode, terms, cifar10, mlflow_server, tmp_path):
    params = {**TINY, "dataset": "cifar10", "data_dir": cifar10[0]}
    if mode == "kd":  # an untrained teacher is enough to exercise the path: 3 channels, 10 classes
        teacher = create_model("resnet8", 10, 3)
        params["teacher_checkpoint"] = save_model_checkpoint(
            tmp_path / "teacher.pt", teacher, {"arch": "resnet8", "dataset": "cifar10", "num_classes": 10,
                                               "in_channels": 3})
    experiment = unique_experiment(f"cifar10-{mode}")
    mlflow_run(mode, mlflow_server, experiment, {**params, "registered_model": f"cifar10-{experiment}"})
    client, runs = runs_of(mlflow_server, experiment)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "cifar10" and run.data.tags["dataset"] == "cifar10"
    assert run.data.params["data_dir"] == str(cifar10[0])
    for term in terms:
        assert f"loss_{term}" in run.data.metrics, term
    assert 0 <= run.data.metrics["test_acc"] <= 100
