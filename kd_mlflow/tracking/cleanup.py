"""``kd-mlflow runs clean``: find the runs left RUNNING by a process that is gone, and mark
them FAILED; report what ``runs/`` holds on disk, and free what no run needs.

MLflow never ends a run whose process died: a crashed ``mlflow run`` launcher (conda
missing, say: the run is created before the environment is built), a killed training, a
machine that rebooted. Such runs stay RUNNING forever, and compare lists them as unfinished.
MLflow has no liveness signal, so kd-mlflow adds one: while a run is open, ``start_run``
sets the tag ``kd_mlflow.heartbeat`` every HEARTBEAT_SECONDS. A RUNNING run is left alone when

- a process on this machine runs it (MLFLOW_RUN_ID in its environment: an ``mlflow run``
  child still importing, loading data ...), or
- it, or the top-level run it is nested in, beat within HEARTBEAT_STALE_SECONDS, or
- its last sign of life (heartbeat, start, latest metric) is more recent than --older-than, or
- it is not a kd-mlflow run (no ``mode`` tag, not made by ``mlflow run`` of one of our
  entry points): nothing says whether its process lives, so it is never touched.

Every other RUNNING run is stale, with one of these reasons: its parent run has ended; its
heartbeat stopped; ``mlflow run`` created it but kd-mlflow never started in it; or (a run
of a kd-mlflow older than the heartbeat) nothing was logged for longer than --older-than.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .lifecycle import HEARTBEAT_SECONDS, HEARTBEAT_TAG
from .offline import OFFLINE_ROOT

HEARTBEAT_STALE_SECONDS = 5 * HEARTBEAT_SECONDS  # five missed beats: the process is gone (or unreachable)
PARENT_TAG = "mlflow.parentRunId"
CLEANED_TAG = "kd_mlflow.cleaned"  # why runs clean marked the run FAILED
# Where a training keeps its per-run files (runs/<run_id>/last.pt, model.pt); the execution
# layer points it at --storage for the cells it runs. Read as cleanup.RUNS_DIR, at use.
RUNS_DIR = OFFLINE_ROOT


@dataclass
class RunVerdict:
    run_id: str
    experiment: str
    run_name: str
    start_time: int  # ms since the epoch
    last_sign_of_life: int  # ms since the epoch
    stale: bool
    reason: str


def _ago(ms: int, now: float) -> str:
    seconds = max(0, int(now - ms / 1000))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
    return f"{seconds // 86400} days"


def _entry_points() -> set[str]:
    from ..modes import MODES

    return {"main", "compare", "benchmark", *MODES}  # as kd_mlflow.mlproject renders them


def local_run_processes() -> dict[str, int]:
    """{MLFLOW_RUN_ID: pid} of this user's processes on this machine (Linux /proc; empty elsewhere)."""
    found: dict[str, int] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(b"MLFLOW_RUN_ID="):
                found.setdefault(item[len(b"MLFLOW_RUN_ID="):].decode(errors="replace"), int(entry.name))
    return found


def _heartbeat(run) -> int | None:
    try:
        return int(run.data.tags.get(HEARTBEAT_TAG, ""))
    except ValueError:
        return None


def _latest_metric_time(run) -> int:
    return max((m.timestamp for m in run.data.to_proto().metrics), default=0)


def judge(run, experiment: str, ancestors: list, processes: dict, older_than_s: float, now: float) -> RunVerdict:
    """Whether the RUNNING ``run`` is stale, and why. ``ancestors``: its parent runs, nearest first."""
    tags = run.data.tags
    beats = [b for b in (_heartbeat(r) for r in (run, *ancestors)) if b]
    beat = max(beats, default=None)
    last = max(run.info.start_time or 0, _latest_metric_time(run), beat or 0)
    verdict = RunVerdict(run.info.run_id, experiment, run.info.run_name or tags.get("mlflow.runName", ""),
                         run.info.start_time or 0, last, False, "")

    def alive(reason: str) -> RunVerdict:
        verdict.reason = reason
        return verdict

    def stale(reason: str) -> RunVerdict:
        verdict.stale, verdict.reason = True, reason
        return verdict

    for r in (run, *ancestors):
        if r.info.run_id in processes:
            return alive(f"process {processes[r.info.run_id]} on this machine runs it")
    if (OFFLINE_ROOT / run.info.run_id / "offline" / "run.json").is_file():
        return alive(f"its offline directory {OFFLINE_ROOT / run.info.run_id / 'offline'} waits for `kd-mlflow sync`")
    if beat and now - beat / 1000 < HEARTBEAT_STALE_SECONDS:
        return alive(f"heartbeat {_ago(beat, now)} ago")
    if now - last / 1000 < older_than_s:
        return alive(f"last sign of life {_ago(last, now)} ago, within --older-than")
    ended = next((r for r in ancestors if r.info.status != "RUNNING"), None)
    if ended is not None:
        return stale(f"its parent run {ended.info.run_name or ended.info.run_id} is {ended.info.status}")
    if beat:
        return stale(f"no heartbeat for {_ago(beat, now)}: its kd-mlflow process is gone")
    root = ancestors[-1] if ancestors else run
    root_tags = root.data.tags
    if "mode" not in tags and root_tags.get("mlflow.source.type") == "PROJECT" \
            and root_tags.get("mlflow.project.entryPoint") in _entry_points():
        env = root_tags.get("mlflow.project.env", "")
        return stale(f"`mlflow run -e {root_tags['mlflow.project.entryPoint']}`{' (env ' + env + ')' if env else ''} "
                     f"created it {_ago(run.info.start_time or 0, now)} ago, but kd-mlflow never started in it "
                     f"(its environment failed: conda missing? use --env-manager local)")
    if "mode" in tags:
        return stale(f"nothing logged for {_ago(last, now)} and no heartbeat (a kd-mlflow older than the heartbeat)")
    return alive("not a kd-mlflow run: nothing tells whether its process lives")


def _experiments(client, name: str) -> dict[str, str]:
    """{experiment_id: name} of the active experiments, or of ``name`` alone."""
    from ..config import ConfigError
    from .health import shown_tracking_uri

    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ConfigError(f"no experiment {name!r} at {shown_tracking_uri()}; "
                              f"list them with `mlflow experiments search`")
        return {exp.experiment_id: exp.name}
    return {e.experiment_id: e.name for e in _all_pages(lambda token: client.search_experiments(
        max_results=1000, page_token=token))}


def _all_pages(search):
    """Every item of a paged MLflow search: ``search(page_token)`` -> a PagedList."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def running_runs(client, experiment_ids: list[str]) -> list:
    return [run for i in range(0, len(experiment_ids), 100)  # 100 experiments a search, to keep requests small
            for run in _all_pages(lambda token: client.search_runs(
                experiment_ids[i:i + 100], filter_string="attributes.status = 'RUNNING'", max_results=1000,
                page_token=token))]


def find_runs(experiment: str = "", older_than_minutes: float = 60.0, client=None) -> list[RunVerdict]:
    """A verdict on every RUNNING run of ``experiment`` (all active experiments when empty)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    names = _experiments(client, experiment)
    runs = running_runs(client, list(names))
    by_id = {r.info.run_id: r for r in runs}

    def ancestors(run) -> list:
        chain, seen = [], {run.info.run_id}
        parent = run.data.tags.get(PARENT_TAG)
        while parent and parent not in seen:
            seen.add(parent)
            if parent not in by_id:
                try:
                    by_id[parent] = client.get_run(parent)
                except Exception:
                    break  # a deleted parent: judged without it
            chain.append(by_id[parent])
            parent = by_id[parent].data.tags.get(PARENT_TAG)
        return chain

    processes, now = local_run_processes(), time.time()
    verdicts = [judge(r, names.get(r.info.experiment_id, r.info.experiment_id), ancestors(r), processes,
                      older_than_minutes * 60, now) for r in runs]
    return sorted(verdicts, key=lambda v: (v.experiment, v.start_time))


def mark_failed(verdicts: list[RunVerdict], client=None) -> None:
    """End each stale run FAILED, at its last sign of life, with the reason as a tag."""
    import mlflow

    client = client or mlflow.MlflowClient()
    for v in verdicts:
        client.set_tag(v.run_id, CLEANED_TAG, v.reason)
        client.set_terminated(v.run_id, "FAILED", end_time=max(v.last_sign_of_life, v.start_time))


def describe(v: RunVerdict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.start_time / 1000)) if v.start_time else "?"
    return f"{v.experiment} / {v.run_name or '-'}  ({v.run_id})  started {started}: {v.reason}"


@dataclass
class WorkdirVerdict:
    path: Path
    size: int  # bytes
    free: bool  # nothing needs it any more
    reason: str


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def judge_workdirs(root: Path = OFFLINE_ROOT, client=None) -> list[WorkdirVerdict]:
    """Each runs/<run_id>/ with its size and whether anything still needs it: an offline
    directory waits for sync, a RUNNING run is training, an unfinished run (FAILED,
    KILLED) with last.pt can be resumed, a run this tracking store does not know is not
    ours to judge. A FINISHED run's files are in the tracking server (the model with its
    checkpoint): they may go."""
    import mlflow

    if not root.is_dir():
        return []
    client = client or mlflow.MlflowClient()
    verdicts = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        size = _size(path)
        if (path / "offline").exists():
            verdicts.append(WorkdirVerdict(path, size, False, f"waits for `kd-mlflow sync {path}`"))
            continue
        try:
            status = client.get_run(path.name).info.status
        except Exception:
            verdicts.append(WorkdirVerdict(path, size, False, "no such run in this tracking store"))
            continue
        if status == "FINISHED":
            verdicts.append(WorkdirVerdict(path, size, True, "FINISHED: its model and metrics are in MLflow"))
        elif status == "RUNNING":
            verdicts.append(WorkdirVerdict(path, size, False, "RUNNING"))
        elif (path / "last.pt").exists():
            verdicts.append(WorkdirVerdict(path, size, False, f"{status}: resumable with --resume {path.name}"))
        else:
            verdicts.append(WorkdirVerdict(path, size, True, f"{status}, with no epoch checkpoint"))
    return verdicts


def clean_workdirs(yes: bool, echo=print, confirm=None, root: Path = OFFLINE_ROOT) -> int:
    """Report runs/ (size, what may go and why) and, with ``yes`` (or ``confirm()``),
    delete the directories nothing needs. -> bytes freed."""
    import shutil

    verdicts = judge_workdirs(root)
    free = [v for v in verdicts if v.free]
    echo(f"{root}/: {len(verdicts)} run director{'y' if len(verdicts) == 1 else 'ies'}, "
         f"{_mb(sum(v.size for v in verdicts))}; {len(free)} no run needs, {_mb(sum(v.size for v in free))}")
    for v in verdicts:
        echo(f"  {v.path.name}  {_mb(v.size):>10}  {'free' if v.free else 'keep'}: {v.reason}")
    if not free:
        return 0
    if not yes and (confirm is None or not confirm(f"delete these {len(free)} director"
                                                    f"{'y' if len(free) == 1 else 'ies'}?")):
        echo("nothing deleted; pass --yes to delete them")
        return 0
    for v in free:
        shutil.rmtree(v.path)
    freed = sum(v.size for v in free)
    echo(f"freed {_mb(freed)} ({len(free)} director{'y' if len(free) == 1 else 'ies'})")
    return freed


def clean(experiment: str, older_than_minutes: float, yes: bool, echo=print, confirm=None) -> list[RunVerdict]:
    """List the stale RUNNING runs and, with ``yes`` (or ``confirm()`` saying so), mark them
    FAILED. Returns the runs marked."""
    from .health import check_tracking_server, shown_tracking_uri

    check_tracking_server()
    verdicts = find_runs(experiment, older_than_minutes)
    stale = [v for v in verdicts if v.stale]
    where = f"experiment {experiment!r}" if experiment else "all experiments"
    echo(f"tracking URI {shown_tracking_uri()}, {where}: {len(verdicts)} RUNNING run(s), {len(stale)} whose "
         f"process is gone")
    for v in stale:
        echo(f"  {describe(v)}")
    alive = len(verdicts) - len(stale)
    if alive:
        echo(f"  ({alive} RUNNING run(s) left alone: alive, too recent for --older-than {older_than_minutes:g}, "
             f"or not kd-mlflow's)")
    if stale and not yes and (confirm is None or not confirm(f"mark these {len(stale)} run(s) FAILED?")):
        echo("nothing changed; pass --yes to mark them FAILED")
        stale = []
    elif stale:
        mark_failed(stale)
        echo(f"marked {len(stale)} run(s) FAILED (tag {CLEANED_TAG} says why)")
    clean_workdirs(yes, echo, confirm)
    return stale


KEEP_ENV = "KD_KEEP_RUN_FILES"  # =1: keep runs/<run_id>/ after a run FINISHED (last.pt, model.pt)
RUN_FILES = ("last.pt", "model.pt")


def release_workdir(run_id: str | None) -> None:
    """After a run FINISHED with everything on the tracking server, its working files go:
    last.pt (the epoch checkpoint, only for resuming an unfinished run) and model.pt (in
    the logged model's extra_files). A run whose offline directory waits for
    ``kd-mlflow sync`` keeps everything; ``kd-mlflow runs clean`` reports what is left."""
    if not run_id or os.environ.get(KEEP_ENV, "") not in ("", "0"):
        return
    workdir = RUNS_DIR / run_id
    if (OFFLINE_ROOT / run_id / "offline").exists() or (workdir / "offline").exists():
        return
    for name in RUN_FILES:
        (workdir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        workdir.rmdir()  # only when nothing else is in it
