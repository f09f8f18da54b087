"""Data-parallel training (torchrun; gloo on CPU): the ranks' shards of a batch are the
one-process batch, two processes train exactly what one process trains, and
`mlflow run -P nproc_per_node=2` makes exactly one MLflow run, FINISHED, with its model.

Why two comparisons: in float64 a 2-process training must equal the 1-process one to
rounding (~1e-8 measured), which pins down the algorithm (sharding, global BatchNorm,
gradient averaging, weighting of an uneven last batch, metric reduction). In the fp32
that real runs use, the same two computations differ by float rounding from the first
step (other summation orders: at initialisation the fp32 gradients of resnet8's first
layers on Fashion-MNIST are only within ~1e-3 of float64's, in one process or two), and
training amplifies it, as changing the number of OpenMP threads of one process does. The end-to-end comparison therefore trains
gently (lr 0.01) and allows what rounding explains (measured over 3 seeds: <= 2.2e-4
relative on the losses, <= 2 images on the accuracies; allowed: 1e-3 and 2 images).
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import descendants, listening_sockets, mlflow_run, runs_of, unique_experiment
from kd_mlflow.data import DATASETS, DeviceBatches, Split


# ------------------------------------------------------------ config and launcher
def test_nproc_per_node_errors_are_one_line_with_the_fix():
    from kd_mlflow.config import Config, ConfigError

    for values, words in [({"nproc_per_node": 0}, "must be >= 1"),
                          ({"nproc_per_node": 3, "batch_size": 128}, "multiple of 3"),
                          ({"nproc_per_node": 2, "device": "cuda:1"}, "-P device=cuda"),
                          ({"nproc_per_node": 2, "device": "mps"}, "-P device=cpu")]:
        with pytest.raises(ConfigError, match=words) as err:
            Config.for_mode("kd", **values).validate()
        assert "\n" not in str(err.value) and ";" in str(err.value)
    Config.for_mode("kd", nproc_per_node=2, batch_size=128, device="cpu").validate()


@pytest.mark.parametrize("mode", ["kd", "kdparam", "teacher"])
def test_the_launched_processes_parse_exactly_the_launchers_config(mode):
    from kd_mlflow.cli import _cli_args, main, train
    from kd_mlflow.config import Config
    from kd_mlflow.modes import MODES

    cfg = Config.for_mode(mode, **Config.taken_by(mode, dict(  # each mode gets the ones it declares
        nproc_per_node=2, lr=0.05, temperature=2.5, compile=True, teacher_checkpoint="", alphas="0.1,0.9",
        experiment="a b", batch_size=64)))
    args = _cli_args(cfg)
    group = train if args[0] == "train" else main
    name, rest = (args[1], args[2:]) if args[0] == "train" else (args[0], args[1:])
    with group.make_context(group.name, [name]) as parent:
        command = group.get_command(parent, name)
        params = command.make_context(name, list(rest), parent=parent).params
    parsed = Config.for_mode(mode, **params)
    assert {f: getattr(parsed, f) for f in MODES[mode].fields} == {f: getattr(cfg, f) for f in MODES[mode].fields}


# ------------------------------------------------------------ sharded batches
@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])  # crop only; crop + flip
def test_shards_of_every_batch_concatenate_to_the_one_process_batch(dataset):
    info = DATASETS[dataset]
    g = torch.Generator().manual_seed(0)
    n = 255  # two full batches of 100 and a last one of 55, split 27 + 28
    split = Split(torch.randint(0, 256, (n, info.in_channels, info.image_size, info.image_size), dtype=torch.uint8,
                                generator=g), torch.randint(0, 10, (n,), generator=g))

    def batches(rank, world):
        return DeviceBatches(split, info, 100, device="cpu", shuffle=True, augment=True, seed=7, rank=rank,
                             world_size=world)

    whole, shards = batches(0, 1), [batches(r, 2) for r in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 3
    assert whole.num_images == shards[0].num_images == n
    for epoch in range(2):  # the second epoch: the generators stayed in step
        for (x, y), *parts in zip(whole, *shards):
            assert [len(p[1]) for p in parts] == [len(y) // 2, len(y) - len(y) // 2]
            assert shards[0].global_size == len(y)
            assert torch.equal(torch.cat([p[0] for p in parts]), x)
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # A last batch smaller than the number of ranks is dropped (no rank may get nothing).
    tiny = DeviceBatches(Split(split.x[:202], split.y[:202]), info, 100, device="cpu", shuffle=False, augment=False,
                         rank=0, world_size=3)
    assert len(tiny) == 2 and tiny.num_images == 200


# ------------------------------------------------------- float64: 2 ranks = 1 rank
def _ab_config():
    from kd_mlflow.config import Config

    return Config.for_mode("ab", train_subset=155, val_size=100, test_subset=100, batch_size=100, epochs=2,
                           alpha=0.1, device="cpu", precision="fp32")


def as_rank(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank ``rank`` of ``world`` (torchrun's environment; the
    process group starts with distributed.session), on one thread, its batches in float64."""
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    normalize = DeviceBatches.normalize
    DeviceBatches.normalize = lambda self, x: normalize(self, x).double()  # this spawned process only


def _train_in_process(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a tiny AB training (a KD mode with connectors, which leaves parameters
    unused in each phase) in float64, through the real Trainer; saves what it saw."""
    as_rank(rank, world, port)
    from kd_mlflow import distributed
    from kd_mlflow.data import DataBundle
    from kd_mlflow.methods.ab.distiller import ActivationBoundaries
    from kd_mlflow.models import create_model
    from kd_mlflow.tracking import NullTracker
    from kd_mlflow.trainer import Trainer, evaluate, seed_everything

    cfg = _ab_config()
    with distributed.session(torch.device("cpu"), cfg.batch_size, world) as device:
        torch.manual_seed(1)
        teacher = create_model("resnet8", 10, 1)
        seed_everything(cfg.seed)
        distiller = ActivationBoundaries(create_model(cfg.student, 10, 1), [teacher], cfg).double()
        splits = torch.load(Path(out_dir) / "data.pt", weights_only=True)  # load_data(cfg), made once
        data = DataBundle(DATASETS[cfg.dataset], *(Split(*splits[k]) for k in ("train", "val", "test")))
        fit = Trainer(distiller, data, cfg, device=device, amp_dtype=None, tracker=NullTracker(),
                      workdir=Path(out_dir) / f"runs-{world}").fit()
        test = DeviceBatches(data.test, data.info, 64, device=device, shuffle=False, augment=False,
                             rank=distributed.rank(), world_size=distributed.world_size())
        torch.save({"history": fit.history, "test": evaluate(distiller.student, test),
                    "state": distiller.student.state_dict(),
                    "bn": [type(m).__name__ for m in distiller.modules() if "BatchNorm" in type(m).__name__]},
                   Path(out_dir) / f"{world}-{rank}.pt")


def _spawn(worlds: tuple[int, ...], out_dir: Path, target=_train_in_process) -> dict[int, list[dict]]:
    """Run a 1-process and a 2-process training side by side -> {world: [rank results]}:
    ``target(rank, world, port, out_dir)`` saves rank r's results as <out_dir>/<world>-<r>.pt."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    for world in worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs += [ctx.Process(target=target, args=(r, world, port, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return {w: [torch.load(out_dir / f"{w}-{r}.pt", weights_only=True) for r in range(w)] for w in worlds}


TIMING = ("epoch_seconds", "images_per_second", "startup_seconds")


def _numbers(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_two_ranks_train_what_one_process_trains_in_float64(tmp_path):
    from kd_mlflow.data import load_data

    data = load_data(_ab_config())
    torch.save({k: (getattr(data, k).x, getattr(data, k).y) for k in ("train", "val", "test")}, tmp_path / "data.pt")
    results = _spawn((1, 2), tmp_path)
    one, two = results[1][0], results[2]
    # Every rank ends with the same numbers and the same network (best epoch included).
    assert _numbers(two[0]["history"]) == _numbers(two[1]["history"])
    assert two[0]["test"] == two[1]["test"]
    assert all(torch.equal(two[0]["state"][k], two[1]["state"][k]) for k in one["state"])
    # ... and they are the one-process numbers (the metrics are accumulated in fp32).
    for mine, ref in zip(_numbers(two[0]["history"]), _numbers(one["history"]), strict=True):
        assert mine == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert two[0]["test"] == pytest.approx(one["test"], rel=1e-6)
    for k, v in one["state"].items():
        assert torch.allclose(two[0]["state"][k].double(), v.double(), rtol=1e-6, atol=1e-9), k
    # The trained student is a plain network again (its BatchNorms were global only while training).
    assert set(one["bn"]) == set(two[0]["bn"]) == {"BatchNorm2d"}


# ------------------------------------------------------------ mlflow run, end to end
SETTINGS = {"train_subset": 600, "val_size": 200, "test_subset": 500, "batch_size": 100, "epochs": 2,
            "lr": 0.01, "device": "cpu", "precision": "fp32", "seed": 0,
            "teacher": "pretrained:fashion_mnist-resnet20"}
LOSSES = ("train_loss", "loss_ce", "loss_kd", "val_loss")


def kd_mlflow_listeners() -> set[tuple[str, int]]:
    """(address, port) of the LISTEN sockets held by this test's kd-mlflow processes: the
    launcher (`mlflow run` starts entry_points/run.py) and its ranks (Linux /proc)."""
    by_inode = {inode: (address, port) for address, port, inode in listening_sockets()}
    found = set()
    # This process's descendants only: the suite runs on pytest-xdist, and another worker's
    # tests have kd-mlflow processes too (a local Ray's driver, say, which listens on every interface).
    for pid in descendants(os.getpid()):
        proc = Path("/proc") / str(pid)
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if not any(name in cmdline for name in (b"kd_mlflow", b"kd-mlflow", b"entry_points/run.py")):
                continue
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in by_inode:
                    found.add(by_inode[target[8:-1]])
        except OSError:
            continue
    return found


@pytest.mark.e2e
def test_mlflow_run_on_two_processes_matches_one_process(mlflow_server):
    experiments = {n: unique_experiment(f"ddp{n}") for n in (1, 2)}

    def launch(n):
        return mlflow_run("kd", mlflow_server, experiments[n],
                          {**SETTINGS, "nproc_per_node": n, "registered_model": f"e2e-{experiments[n]}"})

    sockets: set = set()
    done = threading.Event()

    def watch_sockets():  # what the training processes listen on, sampled while they run
        while not done.wait(0.3):
            sockets.update(kd_mlflow_listeners())

    watcher = threading.Thread(target=watch_sockets, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(2) as pool:  # both at once: the two cores are shared, the start-up waits overlap
        procs = dict(zip((1, 2), pool.map(launch, (1, 2))))
    done.set()
    watcher.join()
    assert "launching 2 processes" in procs[2].stderr
    # The ranks' gloo sockets were seen, and nothing listened beyond the loopback interface
    # (torchrun's TCP rendezvous store would listen on every interface).
    assert sockets, "no listening socket of the ranks was seen"
    assert {address for address, _ in sockets} <= {"127.0.0.1", "::1"}, sockets

    runs = {}
    for n, experiment in experiments.items():
        client, found = runs_of(mlflow_server, experiment)
        assert len(found) == 1, f"nproc_per_node={n}: {len(found)} runs"  # rank 0 adopted mlflow's run, no other
        runs[n] = found[0]
    one, two = runs[1], runs[2]
    assert two.info.status == "FINISHED"
    assert two.data.params["nproc_per_node"] == "2" and two.data.tags["world_size"] == "2"
    versions = client.search_model_versions(f"name='e2e-{experiments[2]}'")  # the model was logged, by rank 0 once
    assert [v.run_id for v in versions] == [two.info.run_id]

    def history(run, name):
        points = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        return [m.value for m in points]

    for name in LOSSES:
        assert history(two, name) == pytest.approx(history(one, name), rel=1e-3), name
    # Accuracies: at most two images apart (of 600 training, 200 validation, 500 test images;
    # measured over 3 seeds: 0-2 training, 0-1 validation, 0-1 test images).
    for name, images in (("train_acc", 600), ("val_acc", 200)):
        for a, b in zip(history(two, name), history(one, name)):
            assert abs(round(a * images / 100) - round(b * images / 100)) <= 2, (name, a, b)
    assert abs(int(two.data.metrics["test_correct"]) - int(one.data.metrics["test_correct"])) <= 2
    assert len(history(two, "train_loss")) == SETTINGS["epochs"]


# ------------------------------------------------------------ SIGTERM and resume
def _stop_in_process(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a loop of all-reduces (a training step's traffic) with the trainer's
    StopVote, under the runner's signal handler. Rank 1 sends itself a real SIGTERM at
    step 3; saves the step at which each rank stopped and how."""
    import signal

    as_rank(rank, world, port)
    from kd_mlflow import distributed
    from kd_mlflow.runner import _terminate_on_sigterm

    stopped = {"step": None, "kind": None}
    with distributed.session(torch.device("cpu"), 2, world), _terminate_on_sigterm():
        # The votes through a gloo group of their own, as beside NCCL on GPUs (session()).
        distributed.process_group.vote_group = torch.distributed.new_group(backend="gloo")
        vote = distributed.StopVote()
        try:
            for step in range(20):
                stopped["step"] = step
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                distributed.all_reduce_sum(torch.ones(1000))
                vote.step()
            vote.drain()
        except KeyboardInterrupt as exc:
            stopped["kind"] = type(exc).__name__
    torch.save(stopped, Path(out_dir) / f"{world}-{rank}.pt")


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Raising where a signal finds a rank (inside DDP's backward, a collective half done)
    once left a rank to abort (exit 134) instead of ending KILLED. Now the first signal is
    recorded, and the ranks agree at a step: rank 0, which got no signal, stops with
    rank 1 at the step whose vote carried it (issued at step 3, read 2 steps later)."""
    [rank0, rank1] = _spawn((2,), tmp_path, target=_stop_in_process)[2]
    assert rank0 == rank1 == {"step": 3 + 2, "kind": "Terminated"}


def test_sigterm_stops_a_two_process_run_as_killed_and_resume_ends_bit_identical(tmp_path):
    """The launcher of a 2-process gloo run gets a real SIGTERM after the first epoch
    checkpoint: it exits 143 with the run KILLED (not RUNNING); `--resume <run id>` on two
    processes finishes it with exactly the numbers of an uninterrupted 2-process run."""
    import re
    import signal

    from test_resume import _interrupt_after_first_epoch, _metrics, _the_run_id, _train

    two = ("--nproc-per-node", "2")
    reference_dir, work = tmp_path / "reference", tmp_path / "interrupted"
    reference_dir.mkdir()
    work.mkdir()
    reference = _train(reference_dir, *two, wait=False)  # side by side: the start-up waits overlap
    try:
        run_id, launcher = _interrupt_after_first_epoch(work, signal.SIGTERM, *two)
        stderr = launcher.stderr.read()
        assert launcher.returncode == 143, stderr[-3000:]
        assert "launching 2 processes" in stderr and "marked KILLED" in stderr
        run, _, _ = _metrics(work, run_id)
        assert run.info.status == "KILLED"
        _, ref_err = reference.communicate(timeout=600)
        assert reference.returncode == 0, ref_err[-3000:]
    finally:
        reference.kill()
    ref_run, ref_val, ref_loss = _metrics(reference_dir, _the_run_id(reference_dir))

    resumed = _train(work, *two, "--resume", run_id)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = re.search(rf"resuming run {run_id} after epoch (\d)/3", resumed.stderr)
    assert after and int(after.group(1)) < 3, resumed.stderr[-3000:]  # it had epochs left to train
    run, val, loss = _metrics(work, run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["nproc_per_node"] == "2"
    assert val == ref_val and loss == ref_loss  # one value per epoch, bit-identical
    assert run.data.metrics["test_acc"] == ref_run.data.metrics["test_acc"]
