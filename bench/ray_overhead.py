"""What the execution layer's Ray costs, and what spreading cells buys, on this machine.

    python bench/ray_overhead.py            # tens of minutes on 2 cores
    python bench/ray_overhead.py --quick    # a smoke run (tiny cells)

Everything runs real `kd-mlflow benchmark` commands against a real `mlflow server` (SQLite,
in a temporary directory) and prints numbers and ratios; the JSON goes to --json.

1. Ray's start: ``ray.init(address="local")`` and ``ray.shutdown()`` in this process.
2. Cost per cell: the same small cells (nokd, seeds 0..K-1) trained in-process (``--jobs 1``)
   and on a local Ray one at a time (``--jobs 0 --cpus-per-cell`` = all cores, so Ray adds
   its start, the worker's start, scheduling and the result's return, and no parallelism),
   for K = 2 and --cells: the difference's slope is Ray's cost per cell, its intercept the
   cost per job. Against one kd cell of the committed regime (5,000 images, 20 epochs):
   timed at 1 and --regime-epochs epochs, so 20 epochs = fixed cost + 20 epochs.
3. Cells per hour of a small benchmark (4 modes x 2 seeds, 5,000 images, --grid-epochs
   epochs) three ways: in-process one at a time (threads 0 and threads 1), local Ray with 2
   cells at once (threads 1 each), and a 2-node ``ray.cluster_utils.Cluster`` on this
   machine (1 CPU per node, threads 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEACHER = "pretrained:fashion_mnist-resnet20"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(workdir: Path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
                             "--artifacts-destination", str(workdir / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(240):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not start")


def _benchmark(uri: str, workdir: Path, args: list[str]) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS"):
        env.pop(var, None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kd_mlflow", "benchmark", *args], cwd=workdir, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmark {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def _ray_start(out: dict) -> None:
    import ray

    t = time.perf_counter()
    ray.init(address="local", include_dashboard=False, object_store_memory=128 * 1024**2, logging_level="ERROR")
    out["ray_start_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ray.shutdown()
    out["ray_shutdown_s"] = time.perf_counter() - t
    print(f"Ray start {out['ray_start_s']:.2f} s, shutdown {out['ray_shutdown_s']:.2f} s")


def _cell_cost(uri, workdir, small, counts, cores, out) -> None:
    """Ray's cost as a job's fixed part (start, first worker) and a per-cell part: the same
    small cells in-process and on a local Ray one at a time, at two job sizes."""
    timed = {}
    for k in counts:
        base = ["--modes", "nokd", "--seeds", str(k), *small]
        timed[k] = (_benchmark(uri, workdir, [*base, "--experiment", f"inproc-{k}"]),
                    _benchmark(uri, workdir, [*base, "--jobs", "0", "--cpus-per-cell", str(cores),
                                              "--experiment", f"ray-serial-{k}"]))
        print(f"{k} small cells: in-process {timed[k][0]:.1f} s, local Ray one at a time {timed[k][1]:.1f} s")
    low, high = min(counts), max(counts)
    extra = {k: ray_s - inproc for k, (inproc, ray_s) in timed.items()}
    per_cell = (extra[high] - extra[low]) / (high - low) if high > low else extra[low] / low
    fixed = extra[low] - low * per_cell
    out.update(cell_timings_s={str(k): {"in_process": v[0], "ray": v[1]} for k, v in timed.items()},
               ray_cost_per_cell_s=per_cell, ray_cost_per_job_s=fixed,
               ray_cost_per_cell_with_start_s={str(k): extra[k] / k for k in counts})
    print(f"Ray adds {fixed:.1f} s per job (its start, the first worker) and {per_cell:.2f} s per cell; "
          f"per cell with the start shared: " + ", ".join(f"{extra[k] / k:.2f} s over {k}" for k in counts))


def _regime_cell(uri, workdir, regime, high, out) -> None:
    """A kd cell of the committed regime at 1 and at ``high`` epochs: its fixed cost and
    its epoch, so a 20-epoch cell is fixed + 20 epochs."""
    timed = {e: _benchmark(uri, workdir, ["--modes", "kd", "--seeds", "1", *regime, "--epochs", str(e),
                                          "--experiment", f"regime-{e}"]) for e in sorted({1, high})}
    epoch = (timed[high] - timed[1]) / (high - 1) if high > 1 else timed[1]
    cell20 = timed[1] - epoch + 20 * epoch
    out.update(regime_timed_s=timed, regime_epoch_s=epoch, regime_cell_20_epochs_s=cell20)
    print(f"kd, 5,000 images: {', '.join(f'{e} epochs {t:.1f} s' for e, t in timed.items())} -> {epoch:.1f} s "
          f"per epoch, about {cell20:.0f} s for 20 epochs")


def _grid(uri, workdir, grid, out) -> None:
    from ray.cluster_utils import Cluster

    ways = {"in-process, threads 0": _benchmark(uri, workdir, [*grid, "--experiment", "g-inproc"]),
            "in-process, threads 1": _benchmark(uri, workdir, [*grid, "--threads", "1", "--experiment", "g-inproc1"]),
            "local Ray, 2 cells at once, threads 1": _benchmark(
                uri, workdir, [*grid, "--threads", "1", "--jobs", "2", "--experiment", "g-ray"])}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ways["2-node cluster, 1 CPU per node, threads 1"] = _benchmark(
            uri, workdir, [*grid, "--threads", "1", "--jobs", "0", "--ray-address", cluster.address,
                           "--storage", str(workdir / "shared"), "--experiment", "g-cluster"])
    finally:
        cluster.shutdown()
    first = next(iter(ways.values()))
    out["grid"] = {}
    print(f"\n8 cells (nokd, kd, dkd, rkd x 2 seeds; 5,000 images, {grid[grid.index('--epochs') + 1]} epochs):")
    for way, seconds in ways.items():
        per_hour = 8 * 3600 / seconds
        out["grid"][way] = {"seconds": seconds, "cells_per_hour": per_hour}
        print(f"  {way:45s} {seconds:7.1f} s  {per_hour:6.1f} cells/h  {first / seconds:4.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny cells: a smoke run of the script")
    ap.add_argument("--parts", default="start,cell,regime,grid", help="which measurements, comma-separated")
    ap.add_argument("--cells", type=int, default=8, help="the larger job (the smaller: 2 cells) for the per-cell cost")
    ap.add_argument("--grid-epochs", type=int, default=2)
    ap.add_argument("--regime-epochs", type=int, default=3, help="the second epoch count the regime cell is timed at")
    ap.add_argument("--json", default="", help="write the numbers here")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    cores = os.cpu_count()
    out: dict = {"cpu_count": cores}
    if "start" in parts:
        _ray_start(out)
    small = ["--teacher", TEACHER, "--train-subset", "256" if a.quick else "512", "--val-size", "100",
             "--test-subset", "200", "--epochs", "1", "--device", "cpu"]
    regime = small[:-4] + ["--device", "cpu"] if a.quick else \
        ["--teacher", TEACHER, "--train-subset", "5000", "--val-size", "5000", "--device", "cpu"]
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        workdir = Path(tmp)
        server, uri = _server(workdir)
        try:
            if "cell" in parts:
                _cell_cost(uri, workdir, small, (1, 2) if a.quick else (2, a.cells), cores, out)
            if "regime" in parts:
                _regime_cell(uri, workdir, regime, 2 if a.quick else a.regime_epochs, out)
            if "ray_cost_per_cell_s" in out and "regime_cell_20_epochs_s" in out:
                out["ray_cost_share_of_regime_cell"] = out["ray_cost_per_cell_s"] / out["regime_cell_20_epochs_s"]
                print(f"Ray's {out['ray_cost_per_cell_s']:.2f} s per cell is "
                      f"{100 * out['ray_cost_share_of_regime_cell']:.2f}% of a 20-epoch cell")
            if "grid" in parts:
                _grid(uri, workdir, [*regime, "--modes", "nokd,kd,dkd,rkd", "--seeds", "2",
                                     "--epochs", str(1 if a.quick else a.grid_epochs)], out)
        finally:
            server.terminate()
            server.wait(timeout=30)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"\nwritten to {a.json}")


if __name__ == "__main__":
    main()
