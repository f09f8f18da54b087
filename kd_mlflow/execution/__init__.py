"""One execution layer for every multi-run job (benchmark cells, sweeps, tune trials).

A job is a list of :class:`Cell` s: a Config, a run name and tags, under one parent run.
:func:`execute` trains them

- in this process, one after the other, when one cell is run at a time and no Ray
  address is given (``--jobs 1``: no Ray is started, so a single run costs nothing more);
- on Ray otherwise: a local Ray started in-process and sized to this machine, or the
  cluster at ``--ray-address`` / ``RAY_ADDRESS``. Each cell is a Ray task holding
  ``--cpus-per-cell`` CPUs and ``--gpus-per-cell`` GPUs (fractions pack small students on
  one card).

Every path trains a cell the same way (:func:`run_cell_here`): an ordinary nested MLflow
run under the parent, through ``runner.run``, with the cell's own ``threads``. A cell's
numbers are therefore a function of its parameters, its seed and the code, whatever ran it.

A cell whose worker process or node is lost is retried by Ray; the retry finds the run
the lost attempt left unfinished (tag ``kd_mlflow.cell``, same settings and code, an epoch
checkpoint in the storage) and continues it from that checkpoint, in the same run. The
same command run again after an interruption does the same for KILLED cells.
"""

from __future__ import annotations

import os

from . import cells as _cells
from .cells import (OPTIONS, RETRIES, Cell, Job, Options, Outcome, _child, add_counts, check_options,  # noqa: F401
                    close_cache, enter_worker, run_cell_here, tracking_uri)


def execute(cells: list[Cell], job: Job, opts: Options, *, on_start=None, on_done=None, echo=print) -> dict:
    """Train ``cells`` (in their order, as resources free up) and call ``on_done(cell,
    outcome)`` for each as it ends -> the teacher cache counters, added up.

    SIGTERM or Ctrl-C stops every cell (their runs end KILLED) and raises Terminated or
    KeyboardInterrupt; the same job run again continues them."""
    if not cells:
        return {}
    if not job.workdir:
        job.workdir = os.getcwd()
    if opts.uses_ray(len(cells)):
        from .ray_backend import execute_on_ray

        return execute_on_ray(cells, job, opts, on_start=on_start, on_done=on_done, echo=echo)
    return _execute_here(cells, job, on_start=on_start, on_done=on_done)


def _execute_here(cells, job, *, on_start=None, on_done=None) -> dict:
    from ..runner import _terminate_on_sigterm

    owns_cache = _cells._cache_session is None  # a job inside a job (kdparam in a benchmark) shares the outer cache
    totals: dict = {}
    try:
        with _terminate_on_sigterm():
            for cell in cells:
                if on_start is not None:
                    on_start(cell, "")
                outcome = run_cell_here(cell, job)
                add_counts(totals, outcome)
                if on_done is not None:
                    on_done(cell, outcome)
    finally:
        if owns_cache:
            close_cache()
    return totals
