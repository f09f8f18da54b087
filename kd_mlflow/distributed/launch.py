"""``kd-mlflow ... --nproc-per-node N``: start N processes with torchrun's environment and
watch them, so that a signal stops them all."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


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
    from the network. Several machines: start torchrun yourself (see docs/operations.md, Distributed training)."""
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
