"""Stopping together: a SIGTERM or Ctrl-C reaching one rank stops every rank at the same
training step (:class:`StopVote`), so the run ends KILLED rather than in an abort."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import process_group
from .process_group import world_size


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run is marked KILLED and the process exits != 0;
    the last completed epoch's checkpoint stays for ``-P resume``."""


def request_stop(signum: int) -> bool:
    """Called by a rank's SIGTERM/SIGINT handler. In a process group the first signal
    is only recorded, and the ranks stop together at a training step they agree on
    (:class:`StopVote`): a rank that raised wherever the signal found it (inside DDP's
    backward, a collective half done) could leave the others, or its own gloo threads,
    in a state that ends in an abort rather than a KILLED run. -> True when recorded;
    False when the caller should raise now (one process, or a second signal)."""
    if world_size() == 1 or process_group.pending_signal:
        return False
    process_group.pending_signal.append(signum)
    return True


def stop_exception(signum: int) -> KeyboardInterrupt:
    import signal

    return Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


class StopVote:
    """Ranks agree, step by step, whether one of them was asked to stop: each step adds
    an all-reduce of one number, issued asynchronously and read ``lag`` steps later.
    The number lives on the CPU and goes through gloo (a gloo group beside NCCL's on
    GPUs, made by :func:`session`), so reading it never waits for the device and the
    code is the same on CPU and GPU. Every rank reads the same value at the same step
    and raises there. No-op in one process."""

    def __init__(self, lag: int = 2):
        self.enabled = world_size() > 1
        self.lag = lag
        self.pending: list = []

    def step(self) -> None:
        if not self.enabled:
            return
        pending = process_group.pending_signal
        flag = torch.tensor([pending[0] if pending else 0], dtype=torch.int32)
        self.pending.append((dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group.vote_group,
                                             async_op=True), flag))
        if len(self.pending) > self.lag:
            self._settle(*self.pending.pop(0))

    def drain(self) -> None:
        """Read every flag still in flight (at the end of an epoch, which syncs anyway)."""
        while self.pending:
            self._settle(*self.pending.pop(0))

    def _settle(self, work, flag) -> None:
        work.wait()
        signum = int(flag.item())
        if signum:
            for later, _ in self.pending:  # issued by every rank alike: let them finish
                later.wait()
            self.pending.clear()
            process_group.pending_signal.clear()
            raise stop_exception(signum)
