"""The cells of a job as Ray tasks: on a local Ray started here, or on a cluster by address.

Imported only when a job runs on Ray, so that one run (and ``--jobs 1``) never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket

import ray

from ..config import ConfigError
from .cells import RETRIES, Cell, Job, Options, Outcome, add_counts, enter_worker, run_cell_here

LOCAL_OBJECT_STORE = 128 * 1024**2  # outcomes are a few hundred bytes; the default 30% of RAM is shm


@ray.remote
def _cell_task(cell: Cell, job: Job, env: dict, driver_code: str) -> Outcome:
    """One cell in a Ray worker process (which trains cells one after another and keeps
    its teacher cache between them)."""
    _python_handles_sigint()
    refused = enter_worker(job, env, driver_code)
    if refused:
        return Outcome(cell.index, error=refused, node=socket.gethostname())
    outcome = run_cell_here(cell, job)
    outcome.node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
    return outcome


def _python_handles_sigint() -> None:
    """Ray stops a running task (ray.cancel, which the driver sends on SIGTERM or Ctrl-C)
    by simulating SIGINT in the worker's main thread, which raises KeyboardInterrupt only
    where Python handles SIGINT. A process that starts with SIGINT ignored keeps it ignored
    (Python installs its handler only where SIGINT has the default action), and so do the
    processes it starts: a driver run as `cmd &` from a script or a non-interactive shell
    (POSIX ignores SIGINT in such background jobs), as under `nohup ... &` in a script,
    hands the ignore down through Ray's raylet to every worker, and its cells cannot be
    stopped. The cell puts Python's handler back, saying so in the worker's log."""
    import signal
    import sys

    handler = signal.getsignal(signal.SIGINT)
    if handler is not signal.default_int_handler:
        print(f"kd-mlflow: this Ray worker's SIGINT handler was {handler!r}; Python's default is set "
              f"again so that a stop reaches its cells", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _connect(opts: Options, echo) -> bool:
    """Ray ready for the job -> whether it was started here (and is stopped at the end)."""
    if ray.is_initialized():
        return False
    address = opts.address()
    common = {"log_to_driver": False, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0][:200]}; "
                              f"start it with `ray start --head` (see docs/many-runs.md) or drop --ray-address") from None
    else:
        # "local": a new Ray of this process, even where another Ray runs on the machine
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE, **common)
    resources = ray.cluster_resources()
    echo(f"Ray {'at ' + address if address else '(local)'}: {int(resources.get('CPU', 0))} CPUs, "
         f"{resources.get('GPU', 0):g} GPUs, {len([n for n in ray.nodes() if n['Alive']])} node(s)")
    return True


def _resources(cell: Cell, opts: Options) -> dict:
    from ..trainer import resolve_threads

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    most_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    gpus_total = sum(r.get("GPU", 0) for r in nodes)
    cpus = opts.cpus_per_cell or resolve_threads(cell.cfg.threads, 1)
    cpus = min(cpus, most_cpus) if most_cpus else cpus
    gpus = opts.gpus_per_cell
    if gpus == -1:
        gpus = 1 if gpus_total and cell.cfg.device in ("auto", "cuda") else 0
    if gpus and not gpus_total:
        raise ConfigError(f"--gpus-per-cell {gpus:g}: the Ray cluster has no GPU; pass --gpus-per-cell 0")
    if cell.cfg.device == "cuda" and not gpus:
        raise ConfigError("device=cuda but --gpus-per-cell 0: Ray would give the cell no GPU; pass "
                          "--gpus-per-cell 1 (or a fraction) or device=cpu")
    return {"num_cpus": cpus, "num_gpus": gpus}


def execute_on_ray(cells: list[Cell], job: Job, opts: Options, *, on_start=None, on_done=None, echo=print) -> dict:
    from ..runner import _terminate_on_sigterm
    from ..tracking import code_version, redact, worker_environment

    job = dataclasses.replace(job, parent=None)  # the cells open their parent by its run id
    started_here = _connect(opts, echo)
    env = worker_environment()
    driver_code = code_version()
    if job.storage:
        job.storage = os.path.abspath(job.storage)
    limit = opts.jobs if opts.jobs > 0 else len(cells)
    queue = list(cells)
    inflight: dict = {}  # ObjectRef -> Cell
    totals: dict = {}
    try:
        resources = [_resources(c, opts) for c in cells]  # every refusal before the first cell starts
        by_index = {c.index: r for c, r in zip(cells, resources)}
        with _terminate_on_sigterm() as received, _as_signalled(received):
            while queue or inflight:
                while queue and len(inflight) < limit:
                    cell = queue.pop(0)
                    ref = _cell_task.options(**by_index[cell.index], max_retries=RETRIES,
                                             retry_exceptions=False).remote(cell, job, env, driver_code)
                    inflight[ref] = cell
                    if on_start is not None:
                        on_start(cell, f"{by_index[cell.index]['num_cpus']:g} CPU"
                                       f"{', %g GPU' % by_index[cell.index]['num_gpus'] if by_index[cell.index]['num_gpus'] else ''}")
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    cell = inflight.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        text = redact(str(exc)).strip().splitlines()
                        outcome = Outcome(cell.index, error=f"lost after {RETRIES} retries ({type(exc).__name__}: "
                                                            f"{text[0][:200] if text else ''}); run the command "
                                                            f"again to continue it")
                    add_counts(totals, outcome)
                    if on_done is not None:
                        on_done(cell, outcome)
    except BaseException:
        _stop(list(inflight), job, echo)
        raise
    finally:
        if started_here:
            ray.shutdown()
    return totals


@contextlib.contextmanager
def _as_signalled(received: list):
    """The signal that arrived, as the exception it stands for: Ray's waits turn whatever a
    signal handler raised into a plain KeyboardInterrupt, which would lose SIGTERM's 143."""
    from ..distributed import stop_exception

    try:
        yield
    except KeyboardInterrupt as exc:
        if received and type(exc) is KeyboardInterrupt:
            raise stop_exception(received[0]) from None
        raise


def _stop(refs: list, job: Job, echo) -> None:
    """Stop the cells in flight: Ray raises KeyboardInterrupt in each (their runs end
    KILLED); a cell that does not stop within a minute is ended by force, and its run
    marked KILLED here."""
    from ..tracking import kill_unfinished_children

    for ref in refs:
        ray.cancel(ref)
    if refs:
        _, stuck = ray.wait(refs, num_returns=len(refs), timeout=60)
        for ref in stuck:
            ray.cancel(ref, force=True)
    try:
        killed = kill_unfinished_children(job.parent_run_id)
    except Exception:  # the tracking server itself may be what went away
        killed = []
    if killed:
        echo(f"marked KILLED: {', '.join(killed)}")
