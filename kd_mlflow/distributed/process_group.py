"""Who this process is in a data-parallel run (rank, world size), the process group's
lifetime (:func:`session`), and the collectives the trainer uses; each a no-op in one process."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from ..errors import ConfigError

# The process's state in a data-parallel run, which session() sets up and clears and the
# stop vote (stop.py) reads: the signal this rank got and has not acted on yet, and a gloo
# group for the vote beside an NCCL default group (None: the default group).
pending_signal: list[int] = []
vote_group = None


# ------------------------------------------------------------------ who am I
def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (torch.distributed.run) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that talks to MLflow and writes files."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# ------------------------------------------------------------------ process group
@contextlib.contextmanager
def session(device: torch.device, batch_size: int, nproc_per_node: int):
    """Inside torchrun with WORLD_SIZE > 1: join the process group and yield this rank's
    device (cuda:LOCAL_RANK on GPUs); the group is destroyed on every exit path.
    Otherwise yield ``device`` unchanged."""
    global vote_group
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if world <= 1:
        yield device
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if nproc_per_node not in (1, local_world):
        raise ConfigError(f"nproc_per_node={nproc_per_node} but torchrun started {local_world} processes per node; "
                          f"drop -P nproc_per_node or make it agree with torchrun --nproc_per_node")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type}; "
                          f"pass -P device=cpu or cuda")
    if batch_size % world:
        raise ConfigError(f"batch_size={batch_size} is the global batch and must split evenly over the "
                          f"{world} processes; use a multiple of {world}")
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} on this node has no GPU of its own ({torch.cuda.device_count()} "
                              f"visible); start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    # 30 min for both backends (NCCL's default is 10): ranks wait in their next collective
    # while rank 0 logs a stage's model, which may wait out a tracking-server outage.
    init = os.environ.get("KD_DIST_INIT_METHOD")
    if init:  # started by launch(): rendezvous through a file, no TCP store
        kwargs.update(init_method=init, rank=int(os.environ["RANK"]), world_size=world)
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(minutes=30), **kwargs)
    if backend_for(device) != "gloo":
        vote_group = dist.new_group(backend="gloo")  # StopVote's CPU numbers
    try:
        yield device
    finally:
        pending_signal.clear()
        vote_group = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ------------------------------------------------------------------ collectives
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it (unchanged in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj=None):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """``fn()`` run on rank 0 only, its result sent to every rank. A ConfigError there is
    raised on every rank (each exits with the same one-line error) instead of leaving the
    other ranks waiting for a result that never comes."""
    if world_size() == 1:
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except ConfigError as exc:
            broadcast_object(("error", str(exc)))
            raise
        except BaseException as exc:
            from ..tracking import redact

            broadcast_object(("crash", redact(f"{type(exc).__name__} on rank 0: {exc}")))
            raise
    outcome = broadcast_object(outcome)
    kind, value = outcome
    if kind == "error":
        raise ConfigError(value)
    if kind == "crash":
        raise RuntimeError(value)
    return value
