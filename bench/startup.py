"""What a `kd-mlflow` process costs around its training: start, and the exit after it.

    python bench/startup.py              # 3 repeats of each, ~2 minutes on 2 cores
    python bench/startup.py --repeats 5

Runs the same tiny training (``train nokd``, 256 images, 1 epoch, a SQLite store in a
temporary directory) two ways, one process at a time, and prints wall and CPU seconds
(the child's user + system time) for each, with their ratio:

- ``program``: ``python -m kd_mlflow``, as the console script and the MLproject's entry
  points run it: the process ends with ``os._exit`` once the command and the atexit
  handlers are done;
- ``teardown``: the same click group called as ``main(prog_name="kd-mlflow")``, so the
  process ends through the interpreter's normal teardown of every module.

The difference is what the teardown costs per process (every `mlflow run`, every rank,
every command of a sweep pays it once). Also timed: ``kd-mlflow modes`` (start and exit
only, no torch training).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEARDOWN = "import sys; from kd_mlflow.cli import main; sys.argv[0] = 'kd-mlflow'; main(prog_name='kd-mlflow')"


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """-> (wall s, CPU s of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kd-bench-startup-") as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        train = ["train", "nokd", "--train-subset", "256", "--val-size", "128", "--test-subset", "256",
                 "--batch-size", "64", "--epochs", "1", "--device", "cpu", "--system-metrics", "false"]
        cases = {
            "train, program": [sys.executable, "-m", "kd_mlflow", *train],
            "train, teardown": [sys.executable, "-c", TEARDOWN, *train],
            "modes, program": [sys.executable, "-m", "kd_mlflow", "modes"],
            "modes, teardown": [sys.executable, "-c", TEARDOWN, "modes"],
        }
        timed(cases["train, program"], env)  # the store's migrations and the data's first read: not timed
        results = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, argv in cases.items():  # interleaved, so drifting load hits both ways alike
                results[name].append(timed(argv, env))
    print(f"{'case':18s} {'wall s (median)':>16s} {'CPU s (median)':>15s}")
    med = {}
    for name, runs in results.items():
        med[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"{name:18s} {med[name][0]:16.2f} {med[name][1]:15.2f}")
    for what in ("train", "modes"):
        (pw, pc), (tw, tc) = med[f"{what}, program"], med[f"{what}, teardown"]
        print(f"{what}: the teardown costs {tw - pw:+.2f} s wall, {tc - pc:+.2f} s CPU per process "
              f"(teardown / program: {tw / pw:.2f}x wall, {tc / pc:.2f}x CPU)")


if __name__ == "__main__":
    main()
