"""What a tracking server missed, kept for ``kd-mlflow sync``: ``runs/<run_id>/offline/``
with run.json (the record), metrics.jsonl and files/. The record format is defined here
once; ``_Offline`` writes it and sync.py reads it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..errors import ConfigError
from .health import _Link

OFFLINE_ROOT = Path("runs")  # the runner's working directory for per-run files
OFFLINE_DIRS: list[Path] = []  # fallback directories written by this process

# ------------------------------------------------------------------ the format
FORMAT = "kd-mlflow-offline/1"
RECORD, METRICS = "run.json", "metrics.jsonl"  # in runs/<run_id>/offline/, beside files/
# What sync uploads, in this order: each a key of the record (metrics: the METRICS file,
# artifacts: their files/); each one finished goes into the record's "done", so an
# interrupted sync continues where it stopped and a second one uploads nothing twice.
STEPS = ("params", "tags", "datasets", "metrics", "artifacts", "models", "registrations", "status")


def new_record(run_id: str, tracking_uri: str) -> dict:
    """The record of one run the server missed (sync adds target_run_id, the run it went to).
    A run created offline (created_offline) also has its run_name and start_time here;
    run_id is then an id the server has never seen, and parent_run_id may be one too."""
    return {"format": FORMAT, "run_id": run_id, "tracking_uri": tracking_uri,
            "experiment_name": None, "parent_run_id": None, "params": {}, "tags": {},
            "artifacts": [], "datasets": [], "models": [], "registrations": [], "status": None,
            "end_time": None,
            "done": []}


def write_record(record: dict, directory: Path) -> None:
    from ..checkpoint import atomic_write_text

    atomic_write_text(json.dumps(record, indent=2, default=str), directory / RECORD)


def read_record(directory: Path) -> dict:
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory / RECORD} is unreadable ({exc}); it was not written by kd-mlflow") from None
    if record.get("format") != FORMAT:
        raise ConfigError(f"{directory / RECORD} is not a kd-mlflow offline record")
    return record


def metric_line(m) -> str:
    return json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n"


def read_metrics(directory: Path):
    from mlflow.entities import Metric

    path = directory / METRICS
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows]


# ------------------------------------------------------------------ the writer
class _Offline:
    """What the tracking server missed for one run: ``runs/<run_id>/offline/`` with
    run.json (params, tags, artifacts, models, final status), metrics.jsonl and files/."""

    def __init__(self, run_id: str, link: _Link):
        self.dir = OFFLINE_ROOT / run_id / "offline"
        self.record = new_record(run_id, link.shown)
        self.used = False
        self._lock = threading.Lock()

    def path_for(self, artifact_path: str) -> Path:
        target = self.dir / "files" / artifact_path
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add(self, key: str, value) -> None:
        with self._lock:
            self.used = True
            if isinstance(self.record[key], dict):
                self.record[key].update(value)
            elif isinstance(self.record[key], list):
                self.record[key].append(value)
            else:
                self.record[key] = value

    def add_file(self, artifact_path: str) -> None:
        self.add("artifacts", artifact_path)

    def add_metrics(self, metrics) -> None:
        if not metrics:
            return
        with self._lock:
            self.used = True
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / METRICS, "a") as f:
                for m in metrics:
                    f.write(metric_line(m))

    def save(self) -> Path | None:
        if not self.used:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        write_record(self.record, self.dir)
        if self.dir not in OFFLINE_DIRS:
            OFFLINE_DIRS.append(self.dir)
        return self.dir
