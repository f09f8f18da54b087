"""The streaming path of image folders (data_loading=stream, or auto when the decoded
images do not fit): DataLoader workers, the same batches whatever the number of workers,
rank shards that concatenate to the one-process batch, bit-identical resume, and two
gloo processes training what one process trains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from imagefolder_fixture import make_image_folder
from kd_mlflow.config import Config, ConfigError
from kd_mlflow.data import DeviceBatches, StreamBatches, load_data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train_per_class=24, test_per_class=4)


def cfg_for(root, **kw) -> Config:
    values = {"dataset": "imagefolder", "data_dir": str(root), "image_size": 24, "val_size": 20, "batch_size": 25,
              "epochs": 2, "lr": 0.05, "device": "cpu", "precision": "fp32", "student": "resnet8",
              "data_loading": "stream", "system_metrics": False, **kw}
    return Config.for_mode("nokd", **values).validate()


def test_streamed_splits_match_the_in_memory_ones(folder, capsys):
    streamed, memory = load_data(cfg_for(folder)), load_data(cfg_for(folder, data_loading="memory"))
    assert type(streamed.train.x).__name__ == "FolderImages" and streamed.info.skipped_images == 1
    assert capsys.readouterr().err.count("broken.jpg") == 2  # one line per read of the folder
    for name in ("train", "validation", "test"):
        assert (streamed.indices[name] == memory.indices[name]).all()
    # evaluation batches: the same decode, so the same tensors
    for split_s, split_m in ((streamed.val, memory.val), (streamed.test, memory.test)):
        a = DeviceBatches(split_s, streamed.info, 16, device="cpu", shuffle=False, augment=False)
        b = DeviceBatches(split_m, memory.info, 16, device="cpu", shuffle=False, augment=False)
        assert isinstance(a, StreamBatches) and not isinstance(b, StreamBatches)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(streamed.test.x[:3], memory.test.x[:3])  # the logged model's example
    with pytest.raises(ConfigError, match="broken.jpg"):
        load_data(cfg_for(folder, corrupt_images="stop"))


def test_training_batches_are_seeded_worker_independent_and_sharded(folder, monkeypatch):
    data = load_data(cfg_for(folder))

    def epochs(workers, seed=0, rank=0, world=1, passes=2):
        monkeypatch.setenv("KD_DATA_WORKERS", str(workers))
        b = DeviceBatches(data.train, data.info, 25, device="cpu", shuffle=True, augment=True, seed=seed,
                          channels_last=False, rank=rank, world_size=world, with_indices=True)
        return [list(b) for _ in range(passes)]

    inline, workers = epochs(0), epochs(2)
    for e_inline, e_workers in zip(inline, workers, strict=True):
        for (x0, y0, r0), (x1, y1, r1) in zip(e_inline, e_workers, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(r0, r1)
    assert not torch.equal(inline[0][0][2], inline[1][0][2])  # a new order each pass
    assert not torch.equal(inline[0][0][0], epochs(0, seed=1, passes=1)[0][0][0])
    assert sorted(torch.cat([r for _, _, r in inline[0]]).tolist()) == list(range(len(data.train)))
    # labels follow the rows
    assert all(torch.equal(y, data.train.y[r]) for _, y, r in inline[0])
    two = [epochs(0, rank=r, world=2, passes=1)[0] for r in (0, 1)]
    for (x, y, _), (xa, ya, _), (xb, yb, _) in zip(inline[0], *two, strict=True):
        assert torch.equal(torch.cat([xa, xb]), x) and torch.equal(torch.cat([ya, yb]), y)


class _StopAt:
    """A tracker that fails while logging epoch ``step``: the run dies after the previous
    epoch's checkpoint, as a killed process does."""

    def __init__(self, step=None):
        self.step, self.run_id = step, None

    def __getattr__(self, name):
        return lambda *a, **k: None

    def log_metrics(self, metrics, step=None):
        if step == self.step:
            raise KeyboardInterrupt("killed")


def _fit(data, cfg, workdir, stop_at=None, resume_state=None):
    from kd_mlflow.methods.base import NoKD
    from kd_mlflow.models import create_model
    from kd_mlflow.trainer import Trainer, seed_everything

    seed_everything(cfg.seed)
    distiller = NoKD(create_model(cfg.student, 5, 3), [], cfg)
    trainer = Trainer(distiller, data, cfg, device=torch.device("cpu"), amp_dtype=None, tracker=_StopAt(stop_at),
                      workdir=workdir)
    return trainer.fit(resume_state)


TIMING = ("epoch_seconds", "images_per_second", "startup_seconds")


def test_resume_streams_the_uninterrupted_batches(folder, tmp_path):
    cfg = cfg_for(folder, epochs=3)
    data = load_data(cfg)
    whole = _fit(data, cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _fit(data, cfg, tmp_path / "cut", stop_at=2)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = _fit(data, cfg, tmp_path / "cut", resume_state=state)
    assert [{k: v for k, v in h.items() if k not in TIMING} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in TIMING} for h in whole.history]
    for k, v in whole.last_student_state.items():
        assert torch.equal(resumed.last_student_state[k], v), k


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a streamed nokd training in float64 through the real Trainer."""
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["KD_DATA_WORKERS"] = "1"
    torch.set_num_threads(1)
    normalize = DeviceBatches.normalize
    DeviceBatches.normalize = lambda self, x: normalize(self, x).double()  # this spawned process only
    from kd_mlflow import distributed
    from kd_mlflow.methods.base import NoKD
    from kd_mlflow.models import create_model
    from kd_mlflow.trainer import Trainer, seed_everything

    cfg = cfg_for(Path(out_dir) / "images", epochs=2, batch_size=20)
    with distributed.session(torch.device("cpu"), cfg.batch_size, world) as device:
        data = load_data(cfg)
        seed_everything(cfg.seed)
        distiller = NoKD(create_model(cfg.student, 5, 3), [], cfg).double()
        fit = Trainer(distiller, data, cfg, device=device, amp_dtype=None, tracker=_StopAt(),
                      workdir=Path(out_dir) / f"runs-{world}").fit()
        torch.save({"history": [{k: v for k, v in h.items() if k not in TIMING} for h in fit.history],
                    "state": distiller.student.state_dict()}, Path(out_dir) / f"{world}-{rank}.pt")


def test_two_gloo_processes_stream_what_one_process_streams(tmp_path):
    from test_distributed import _spawn

    make_image_folder(tmp_path / "images", train_per_class=16, test_per_class=2)
    results = _spawn((1, 2), tmp_path, target=_rank)
    one, two = results[1][0], results[2]
    assert two[0]["history"] == two[1]["history"]
    for mine, ref in zip(two[0]["history"], one["history"], strict=True):
        assert mine == pytest.approx(ref, rel=1e-6, abs=1e-9)
    for k, v in one["state"].items():
        assert torch.allclose(two[0]["state"][k].double(), v.double(), rtol=1e-6, atol=1e-9), k


def test_throughput_benchmark_quick(tmp_path, monkeypatch):
    """The benchmark runs and writes its JSON (it asserts no speed)."""
    import importlib.util
    import json

    monkeypatch.setenv("KD_DATA_WORKERS", "0")  # the benchmark sets it; restored afterwards
    spec = importlib.util.spec_from_file_location("throughput_imagefolder",
                                                  Path(__file__).parent.parent / "bench" / "throughput_imagefolder.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--sizes", "32", "--workers", "0", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["size"] == 32 and row["streaming_images_per_second"] > 0 and row["reference_images_per_second"] > 0
    assert row["in_memory_images_per_second"] > 0


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_broken_after_indexing_is_one_line(workers, tmp_path, monkeypatch):
    root = make_image_folder(tmp_path, train_per_class=4, test_per_class=2, corrupt=False)
    data = load_data(cfg_for(root, val_size=2))
    victim = next((root / "train" / "apple").glob("*.png"))
    victim.write_bytes(b"\x89PNG\r\n\x1a\n broken since")
    monkeypatch.setenv("KD_DATA_WORKERS", str(workers))
    batches = DeviceBatches(data.train, data.info, 18, device="cpu", shuffle=False, augment=True)
    with pytest.raises(ConfigError) as err:
        list(batches)
    message = str(err.value)
    assert message.startswith(f"cannot read image {victim} (") and "resume" in message
    assert "\n" not in message and "Traceback" not in message
