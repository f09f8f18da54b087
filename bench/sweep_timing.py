"""Wall time of a kdparam grid against one kd run of the same setting, with the teacher
cache (kd_mlflow/teacher_cache.py) on and off.

    python bench/sweep_timing.py                          # 10,000 images x 3 epochs, 3x3 grid
    python bench/sweep_timing.py --images 500 --epochs 1 --val-size 200 --test-subset 200  # smoke
    python bench/sweep_timing.py --rows in-process        # without `mlflow run` processes

Rows:

* ``mlflow run`` (the headline): each of ``mlflow run . -e kd``, ``-e kdparam -P
  teacher_cache=false`` and ``-e kdparam -P teacher_cache=true`` as its own process,
  timed from launch to exit, against a fresh SQLite store in a temporary directory
  (created before the first timed run, so no row pays for its tables). Everything a
  user waits for is in: process start, data, training, evaluation, figures, log_model.
* ``in process``: the same three trainings through ``kd_mlflow.runner.run`` in this
  process without MLflow (a null tracker), after an untimed warm-up run, so process start
  and MLflow are out and the ratio is the training's own.

The ratio is the grid's time over the kd run's; the issue's target is <= 5x with the
cache for the 3x3 grid on 10,000 images x 3 epochs. Both sides use the package defaults
(resnet20 -> resnet8 on Fashion-MNIST, batch 128, 5,000 validation images, the whole
test set, precision auto) unless the options say otherwise. Prints a table; ``--json
PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _settings(args) -> dict:
    return {"train_subset": args.images, "epochs": args.epochs, "val_size": args.val_size,
            "test_subset": args.test_subset, "device": args.device, "precision": args.precision}


def _grid(args) -> dict:
    return {"temperatures": args.temperatures, "alphas": args.alphas}


def _cases(args):
    """(label, entry point, parameters) of the three timed trainings, in order."""
    common = _settings(args)
    return [("kd", "kd", common),
            ("kdparam, cache off", "kdparam", {**common, **_grid(args), "teacher_cache": "false"}),
            ("kdparam, cache on", "kdparam", {**common, **_grid(args), "teacher_cache": "true"})]


# ------------------------------------------------------------------ mlflow run
def mlflow_run_row(args, workdir: Path) -> dict:
    import mlflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    experiment = "sweep-timing"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(experiment, artifact_location=str(workdir / "artifacts"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env.update({"MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{env.get('PATH', '')}"})
    seconds = {}
    for label, entry, params in _cases(args):
        cmd = [str(BIN / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local",
               "--experiment-name", experiment]
        for k, v in params.items():
            cmd += ["-P", f"{k}={v}"]
        print(f"mlflow run: {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds[label] = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    counts = {}
    for run in client.search_runs([experiment_id], "tags.mode = 'kdparam'"):
        if run.data.params.get("teacher_cache", "").lower() == "true":  # as `mlflow run` logged -P teacher_cache
            counts = {k: int(v) for k, v in run.data.metrics.items() if k.startswith("teacher_forwards_")}
    return {"seconds": seconds, "teacher_forwards": counts}


# ------------------------------------------------------------------ in process
def in_process_row(args, workdir: Path) -> dict:
    from kd_mlflow.config import Config
    from kd_mlflow.runner import run
    from kd_mlflow.tracking import NullTracker

    class Parent(NullTracker):
        """Keeps the teacher-cache counters the kdparam parent logs."""

        def __init__(self):
            self.metrics = {}

        def log_metrics(self, metrics, step=None):
            self.metrics.update({k: v for k, v in metrics.items() if k.startswith("teacher_forwards_")})

        def log_figure(self, fig, path):
            import matplotlib.pyplot as plt

            plt.close(fig)

    def train(mode: str, params: dict) -> Parent:
        tracker = Parent()

        @contextlib.contextmanager
        def start(*_, **__):
            yield tracker

        values = {k: (v == "true" if k == "teacher_cache" else v) for k, v in params.items()}
        run(Config.for_mode(mode, system_metrics=False, **values), tracker_factory=start)
        return tracker

    os.chdir(workdir)  # runs/untracked/ checkpoints land in the temporary directory
    print("in process: warm-up (untimed) ...", file=sys.stderr, flush=True)
    train("kd", {**_settings(args), "train_subset": 256, "epochs": 1, "val_size": 256, "test_subset": 256})
    seconds, counts = {}, {}
    for label, mode, params in _cases(args):
        print(f"in process: {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tracker = train(mode, params)
        seconds[label] = time.perf_counter() - start
        if params.get("teacher_cache") == "true":
            counts = {k: int(v) for k, v in tracker.metrics.items()}
    return {"seconds": seconds, "teacher_forwards": counts}


# ------------------------------------------------------------------ report
def table(rows: dict, args) -> str:
    cells = len(args.temperatures.split(",")) * len(args.alphas.split(","))
    lines = [f"kdparam {cells}-cell grid (T {args.temperatures} x alpha {args.alphas}) vs one kd run: resnet20 -> "
             f"resnet8, fashion_mnist, {args.images} images x {args.epochs} epochs, val {args.val_size}, "
             f"test {args.test_subset or 'all'}, device {args.device}, precision {args.precision}",
             "",
             "| how | kd run | kdparam, cache off | kdparam, cache on | ratio off | ratio on | teacher forwards "
             "computed / reused (cache on) |",
             "|---|---|---|---|---|---|---|"]
    for how, row in rows.items():
        s = row["seconds"]
        kd, off, on = s["kd"], s["kdparam, cache off"], s["kdparam, cache on"]
        tf = row["teacher_forwards"]
        forwards = (f"{tf.get('teacher_forwards_computed', '?')} / {tf.get('teacher_forwards_reused', '?')}"
                    if tf else "n/a")
        lines.append(f"| {how} | {kd:.1f} s | {off:.1f} s | {on:.1f} s | {off / kd:.2f}x | {on / kd:.2f}x | "
                     f"{forwards} |")
    lines.append("")
    lines.append("ratio = the grid's wall time / the kd run's (issue 17's target: <= 5x with the cache, 3x3 grid, "
                 "10,000 images x 3 epochs)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000, help="train_subset")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--temperatures", default="1,4,16")
    parser.add_argument("--alphas", default="0.1,0.5,0.9")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--test-subset", type=int, default=0, help="0 = the whole test set")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rows", default="mlflow-run,in-process", help="mlflow-run, in-process or both")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - {"mlflow-run", "in-process"}
    if unknown:
        raise SystemExit(f"error: unknown rows {', '.join(sorted(unknown))}; use mlflow-run, in-process or both")

    import torch

    results = {}
    with tempfile.TemporaryDirectory(prefix="sweep-timing-") as tmp:
        if "mlflow-run" in rows:
            (Path(tmp) / "mlflow-run").mkdir()
            results["mlflow run"] = mlflow_run_row(args, Path(tmp) / "mlflow-run")
        if "in-process" in rows:
            (Path(tmp) / "in-process").mkdir()
            cwd = os.getcwd()
            try:
                results["in process"] = in_process_row(args, Path(tmp) / "in-process")
            finally:
                os.chdir(cwd)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": {**_settings(args), **_grid(args)}, "rows": results,
            "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
