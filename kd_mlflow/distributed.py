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

import contextlib
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


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
    global _vote_group
    if backend_for(device) != "gloo":
        _vote_group = dist.new_group(backend="gloo")  # StopVote's CPU numbers
    try:
        yield device
    finally:
        _stop_signal.clear()
        _vote_group = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ------------------------------------------------------------------ stopping together
class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run is marked KILLED and the process exits != 0;
    the last completed epoch's checkpoint stays for ``-P resume``."""


_stop_signal: list[int] = []  # the signal this rank got and has not acted on yet
_vote_group = None  # a gloo group for StopVote beside an NCCL default group; None: the default


def request_stop(signum: int) -> bool:
    """Called by a rank's SIGTERM/SIGINT handler. In a process group the first signal
    is only recorded, and the ranks stop together at a training step they agree on
    (:class:`StopVote`): a rank that raised wherever the signal found it (inside DDP's
    backward, a collective half done) could leave the others, or its own gloo threads,
    in a state that ends in an abort rather than a KILLED run. -> True when recorded;
    False when the caller should raise now (one process, or a second signal)."""
    if world_size() == 1 or _stop_signal:
        return False
    _stop_signal.append(signum)
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
        flag = torch.tensor([_stop_signal[0] if _stop_signal else 0], dtype=torch.int32)
        self.pending.append((dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_vote_group, async_op=True), flag))
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
            _stop_signal.clear()
            raise stop_exception(signum)


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
            from .tracking import redact

            broadcast_object(("crash", redact(f"{type(exc).__name__} on rank 0: {exc}")))
            raise
    outcome = broadcast_object(outcome)
    kind, value = outcome
    if kind == "error":
        raise ConfigError(value)
    if kind == "crash":
        raise RuntimeError(value)
    return value


# ------------------------------------------------------------------ global BatchNorm
def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # bf16/fp16: upcast


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with the global batch's ``mean``/``invstd``
    (computed without autograd by the module); the backward adds what the statistics owe
    to the gradient, from the global sums of dy and dy * (x - mean) (one all-reduce):

        dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * weight

    weight/bias get this rank's sums (DDP averages them over the ranks like any gradient).
    A handful of passes over the activations, against ~15 for the same maths written as
    autograd ops (measured on the 2-core CPU, kd resnet20 -> resnet8: 27 s per 2-process
    epoch instead of 30 s)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count):
        view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.has_bias = bias is not None
        return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        view = (1, c) + (1,) * (x.dim() - 2)
        dtype = mean.dtype
        xmu = x.to(dtype) - mean.view(view)
        dyf = dy.to(dtype)
        local = torch.cat([dyf.sum(dims), (dyf * xmu).sum(dims)])
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        mean_dy, mean_dy_xmu = total[:c] / count, total[c:] / count
        scale = invstd if weight is None else invstd * weight.to(dtype)
        dx = torch.addcmul((-mean_dy * scale).view(view), dyf, scale.view(view))
        dx.addcmul_(xmu, (-invstd * invstd * mean_dy_xmu * scale).view(view))
        grad_weight = None if weight is None else (local[c:] * invstd).to(weight.dtype)
        grad_bias = local[:c].to(weight.dtype if weight is not None else dtype) if ctx.has_bias else None
        return dx.to(x.dtype), grad_weight, grad_bias, None, None, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training inside a process group, normalises with the mean and
    variance of the *global* batch (the union of every rank's shard) and updates its
    running statistics with them, identically on every rank. Same parameters, buffers
    and state_dict keys as BatchNorm2d; in eval mode or in one process it is BatchNorm2d.

    Each rank computes its shard's (count, mean, variance) (torch.var_mean, stable); one
    all-reduce gathers them and they are combined with Chan et al.'s parallel formula
    (the shards' variances plus the squared offsets of their means), which does not
    cancel the way ``E[x^2] - E[x]^2`` does. :class:`_GlobalBatchNorm` normalises and
    makes the gradient that of the global batch: in float64 a 2-process training matches
    the 1-process one to ~1e-8 (tests/test_distributed.py). Statistics are computed in
    fp32 at least (bf16 inputs are upcast).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        c, world = x.shape[1], world_size()
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            xs = x.to(_stat_dtype(x))
            local_var, local_mean = torch.var_mean(xs, dims, correction=0)
            # Row r holds rank r's (count, mean, variance): an all-reduce of rows is a gather.
            rows = torch.zeros(world, 2 * c + 1, device=x.device, dtype=xs.dtype)
            rows[rank(), 0] = x.numel() // c
            rows[rank(), 1:c + 1] = local_mean
            rows[rank(), c + 1:] = local_var
            dist.all_reduce(rows, op=dist.ReduceOp.SUM)
            counts, means, variances = rows[:, :1], rows[:, 1:c + 1], rows[:, c + 1:]
            count = counts.sum()
            mean = (counts * means).sum(0) / count
            var = (counts * (variances + (means - mean) ** 2)).sum(0) / count
            invstd = torch.rsqrt(var + self.eps)
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, invstd, count)


def convert_batchnorm(module: nn.Module) -> list[nn.Module]:
    """Turn every BatchNorm2d inside ``module`` into a GlobalBatchNorm2d in place (same
    object, same Parameters: an optimizer built before keeps working). -> the converted
    modules, for :func:`revert_batchnorm`."""
    converted = [m for m in module.modules() if type(m) is nn.BatchNorm2d]
    for m in converted:
        m.__class__ = GlobalBatchNorm2d
    return converted


def revert_batchnorm(converted: list[nn.Module]) -> None:
    for m in converted:
        m.__class__ = nn.BatchNorm2d


# ------------------------------------------------------------------ DDP
class _Step(nn.Module):
    """What DDP wraps: the distiller's forward with the logits detached, so DDP looks
    for gradients only where the losses come from (AB's first phase returns logits that
    no loss uses)."""

    def __init__(self, distiller: nn.Module):
        super().__init__()
        self.distiller = distiller

    def forward(self, x, y, **kwargs):  # kwargs: e.g. index=, for a Distiller that wants_indices
        logits, losses = self.distiller(x, y, **kwargs)
        return logits.detach(), losses


def wrap(distiller: nn.Module, device: torch.device) -> tuple[nn.Module, list[nn.Module]]:
    """-> (the module to call for a training step, the converted BatchNorms).

    In one process: the distiller itself. In a process group: DistributedDataParallel
    over the student and connectors with global BatchNorm; the frozen teachers are
    replicated as they are (every rank loads the same checkpoint), never broadcast or
    all-reduced. A method whose losses leave some trainable parameters out in some steps
    (AB: its connectors after the first phase) says so with ``leaves_parameters_unused``;
    DDP then looks for them every step (a graph traversal the others do not pay)."""
    if world_size() == 1:
        return distiller, []
    from torch.nn.parallel import DistributedDataParallel

    converted = []
    for name, child in distiller.named_children():
        if name != "teachers":
            converted += convert_batchnorm(child)
    step = _Step(distiller)
    frozen = [f"distiller.{n}" for n, _ in [*distiller.named_parameters(), *distiller.named_buffers()]
              if n.startswith("teachers.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
    # No buffer sync per step: GlobalBatchNorm2d updates the running statistics
    # identically on every rank, so re-sending them before every step would buy nothing.
    ddp = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False,
                                  find_unused_parameters=bool(getattr(distiller, "leaves_parameters_unused", False)))
    return ddp, converted


# ------------------------------------------------------------------ launching
def _loopback_interface() -> str | None:
    import socket

    with contextlib.suppress(OSError, AttributeError):
        for _, name in socket.if_nameindex():
            if name in ("lo", "lo0"):
                return name
    return None


def _shell_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: killed by signal N -> 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def launch(nproc: int, args: list[str]) -> int:
    """Run ``kd-mlflow ARGS`` as ``nproc`` processes of this node and wait. -> the exit
    code of the first rank that failed (2 for a bad input, 143 after SIGTERM, ...; 0
    when all succeeded), so callers and ``mlflow run`` see what one process would return.

    The processes get torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, ...), but meet
    through a file in a private temporary directory instead of torchrun's TCP store,
    and gloo/NCCL are pinned to the loopback interface: PyTorch's TCPStore listens on
    every network interface, and a run on one machine has no business being reachable
    from the network. Several machines: start torchrun yourself (see README)."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    rendezvous_dir = tempfile.mkdtemp(prefix="kd-mlflow-rendezvous-")  # mode 0700
    env = dict(os.environ)
    # The children import this very checkout, installed or not (mlflow run . uses the tree).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))  # the cores shared out
    loopback = _loopback_interface()
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
        env.setdefault("NCCL_SOCKET_IFNAME", loopback)
    env.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK="0",
               KD_DIST_INIT_METHOD=f"file://{rendezvous_dir}/store")
    print(f"launching {nproc} processes on this machine (rendezvous in {rendezvous_dir}, sockets on "
          f"{loopback or 'the default interface'})", file=sys.stderr, flush=True)
    procs = []
    # Each rank in its own session: a terminal's Ctrl-C reaches the launcher once, which
    # passes it on once (a second SIGINT would cut a rank's cleanup short).
    for r in range(nproc):
        procs.append(subprocess.Popen([sys.executable, "-m", "kd_mlflow", *args], start_new_session=True,
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))

    received: list[int] = []  # the signals the launcher itself got and passed on

    def forward(signum, frame):
        if frame is not None:  # a real signal, not the launcher's own clean-up below
            received.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    first_failure: tuple[int, int] | None = None
    stop_at = None
    escalated = 0
    try:
        while any(p.poll() is None for p in procs):
            for r, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0) and first_failure is None:
                    first_failure = (r, _shell_code(code))
                    stop_at = time.monotonic() + 30  # the others see the broken group and stop
            if received and escalated < len(received):
                # The ranks stop together at their next training step; one that is not
                # in a step (waiting for the tracking server, say) gets the signal again
                # after a minute, which stops it where it is.
                escalated = len(received)
                stop_at = time.monotonic() + 60
            if stop_at is not None and time.monotonic() > stop_at:
                forward(received[-1] if received else signal.SIGTERM, None)
                stop_at = time.monotonic() + 15
            time.sleep(0.2)
        for r, p in enumerate(procs):
            if p.returncode != 0 and first_failure is None:
                first_failure = (r, _shell_code(p.returncode))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(rendezvous_dir, ignore_errors=True)
    if received and first_failure is not None:
        # Stopped on request: the exit code says so (143 after SIGTERM, 130 after Ctrl-C),
        # whatever a rank died of on the way out; that is still shown.
        code = 128 + received[0]
        for r, p in enumerate(procs):
            if _shell_code(p.returncode) not in (0, code):
                print(f"note: rank {r} ended with exit code {_shell_code(p.returncode)} while stopping",
                      file=sys.stderr)
        return code
    if first_failure is None:
        return 0
    rank_, code = first_failure
    if code not in (1, 2, 130, 143):  # those the rank has explained itself
        print(f"error: rank {rank_} failed first, with exit code {code}", file=sys.stderr)
    return code
