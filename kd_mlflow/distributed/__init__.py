"""Data-parallel training across processes: launch, process group, collectives, and
a BatchNorm whose statistics are those of the global batch.

``torchrun`` (or ``kd-mlflow ... --nproc-per-node N``, which starts the processes itself
with torchrun's environment, see ``launch``) runs one process per GPU, or N processes on
a CPU. Each process ("rank") trains the same student on its shard of every global batch;
DistributedDataParallel averages the gradients. Every helper here is a no-op in a single process, so the trainer keeps one
code path and a one-process run computes exactly what it did before.

Why a BatchNorm of our own: ``torch.nn.SyncBatchNorm`` refuses CPU tensors, and without
global statistics a run on N shards normalises every layer differently from the same
run in one process. :class:`GlobalBatchNorm2d` is portable (gloo on CPU, NCCL on CUDA)
and makes an N-process run match the one-process run with the same global batch.
"""

from __future__ import annotations

from . import process_group  # noqa: F401  (process_group.vote_group: the state a test may set)
from .batchnorm import GlobalBatchNorm2d, convert_batchnorm, revert_batchnorm
from .ddp import wrap
from .launch import launch
from .process_group import (all_reduce_sum, backend_for, broadcast_object, is_initialized, is_main,
                            launched_by_torchrun, on_main, rank, session, world_size)
from .stop import StopVote, Terminated, request_stop, stop_exception

__all__ = ["GlobalBatchNorm2d", "StopVote", "Terminated", "all_reduce_sum", "backend_for", "broadcast_object",
           "convert_batchnorm", "is_initialized", "is_main", "launch", "launched_by_torchrun", "on_main", "rank",
           "request_stop", "revert_batchnorm", "session", "stop_exception", "world_size", "wrap"]
