"""Throughput and overhead benchmark: the package's trainer against a plain reference loop.

    python bench/throughput.py                 # CPU, Fashion-MNIST, full table (minutes)
    python bench/throughput.py --quick         # tiny smoke run (what the test suite runs)
    python bench/throughput.py --device cuda --cifar-shaped   # GPU: 3x32x32 inputs

It prints a table and writes JSON (``--json PATH``, default bench/results/<time>.json).

(a) the package: ``kd_mlflow.trainer.Trainer`` (device-resident uint8 data, batched crop
    on the device, channels_last, precision=auto, metrics read once per epoch);
(b) the reference: what most KD research code does: a torchvision dataset with
    per-sample PIL transforms, a DataLoader with 2 workers, the fp32 teacher run on
    every batch, a loss ``.item()`` per step.

Both train the same models with the same optimizer on the same images for one epoch
after a warm-up; the ratio (a)/(b) is printed per mode. Also measured: MLflow logging
cost as a share of an epoch (tracker calls timed on the training thread, and the same
epoch with the tracker on and off), ``log_model`` seconds, process start to first
training step (from a real ``kd-mlflow train`` subprocess), and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kd_mlflow.config import Config  # noqa: E402
from kd_mlflow.data import DATASETS, DataBundle, Split, load_data  # noqa: E402
from kd_mlflow.distillers.base import NoKD  # noqa: E402
from kd_mlflow.distillers.kd import HintonKD, hinton_kd_loss  # noqa: E402
from kd_mlflow.distillers.rkd import RelationalKD, rkd_angle_loss, rkd_distance_loss  # noqa: E402
from kd_mlflow.models import create_model  # noqa: E402
from kd_mlflow.tracking import NullTracker  # noqa: E402
from kd_mlflow.trainer import Trainer, resolve_device, resolve_precision  # noqa: E402

MODES = {  # mode -> (distiller, teacher arch, student arch)
    "nokd": (NoKD, None, "resnet8"),
    "kd": (HintonKD, "resnet20", "resnet8"),
    "rkd": (RelationalKD, "resnet20", "resnet8"),
}
GPU_PAIRS = {"kd resnet56->resnet20": ("resnet56", "resnet20"), "kd resnet18->resnet8": ("resnet18", "resnet8")}


# ------------------------------------------------------------------ (b) reference
def _torchvision_fashion_mnist(root: Path):
    """torchvision's FashionMNIST over the Debian package's files (no download)."""
    import torchvision

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    src = Path(os.environ.get("KD_DATA_DIR") or "/usr/share/datasets/fashion-mnist")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        if not (raw / name).exists():
            with gzip.open(src / f"{name}.gz") as f, open(raw / name, "wb") as out:
                shutil.copyfileobj(f, out)
    info = DATASETS["fashion_mnist"]
    tf = torchvision.transforms.Compose([
        torchvision.transforms.RandomCrop(28, padding=info.crop_padding),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(info.mean, info.std),
    ])
    return torchvision.datasets.FashionMNIST(str(root), train=True, transform=tf, download=False)


def reference_epoch(mode: str, dataset, n_images: int, batch_size: int, workers: int) -> float:
    """One epoch of the plain loop over the first ``n_images``; -> images/s."""
    _, teacher_arch, student_arch = MODES[mode]
    torch.manual_seed(0)
    student = create_model(student_arch, 10, 1)
    teacher = create_model(teacher_arch, 10, 1).eval() if teacher_arch else None
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    subset = torch.utils.data.Subset(dataset, range(n_images))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=False)

    def step(x, y):
        if mode == "nokd":
            loss = F.cross_entropy(student(x), y)
        elif mode == "kd":
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = 0.1 * F.cross_entropy(s, y) + 0.9 * hinton_kd_loss(s, t, 4.0)
        else:  # rkd
            with torch.no_grad():
                t = teacher.features(x)
            s = student.features(x)
            loss = (0.1 * F.cross_entropy(s.logits, y) + 0.9 * hinton_kd_loss(s.logits, t.logits, 4.0)
                    + 25 * rkd_distance_loss(s.embedding, t.embedding) + 50 * rkd_angle_loss(s.embedding, t.embedding))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()  # what such loops do for their progress bar

    student.train()
    for i, (x, y) in enumerate(loader):  # warm-up: a few batches
        step(x, y)
        if i == 2:
            break
    start = time.perf_counter()
    seen = 0
    for x, y in loader:
        step(x, y)
        seen += len(y)
    return seen / (time.perf_counter() - start)


# ------------------------------------------------------------------ (a) the package
class TimedTracker(NullTracker):
    """Wraps a tracker and adds up the seconds its calls take on the training thread."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.run_id = getattr(inner, "run_id", None)

    def log_metrics(self, metrics, step=None):
        start = time.perf_counter()
        self.inner.log_metrics(metrics, step=step)
        self.seconds += time.perf_counter() - start


def package_epochs(mode: str, data: DataBundle, cfg: Config, device, amp, tracker, epochs: int = 2,
                   student_arch=None, teacher_arch=None) -> dict:
    cls, t_arch, s_arch = MODES[mode]
    info = data.info
    torch.manual_seed(0)
    student = create_model(student_arch or s_arch, info.num_classes, info.in_channels)
    teacher_arch = teacher_arch or t_arch
    teachers = [create_model(teacher_arch, info.num_classes, info.in_channels)] if teacher_arch else []
    distiller = cls(student, teachers, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(distiller, data, cfg.replace(epochs=epochs), device=device, amp_dtype=amp,
                          tracker=tracker, workdir=Path(tmp), epochs=epochs, progress_desc=f"bench {mode}")
        fit = trainer.fit()
    last = fit.history[-1]  # epoch 0 is the warm-up (allocator, oneDNN/cuDNN autotuning)
    return {"images_per_second": last["images_per_second"], "epoch_seconds": last["epoch_seconds"],
            "train_loss": last["train_loss"]}


# ------------------------------------------------------------------ overheads
def mlflow_overheads(data: DataBundle, cfg: Config, device, amp, tmp: Path) -> dict:
    import mlflow

    from kd_mlflow.tracking import MlflowTracker
    from kd_mlflow.runner import example_input

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
    mlflow.set_experiment("bench")
    off = package_epochs("kd", data, cfg, device, amp, NullTracker())
    with mlflow.start_run() as run:
        timed = TimedTracker(MlflowTracker(run.info.run_id))
        on = package_epochs("kd", data, cfg, device, amp, timed)
        model = create_model("resnet8", data.info.num_classes, data.info.in_channels).eval()
        start = time.perf_counter()
        timed.inner.log_model(model, example_input(data), registered_name="bench-resnet8")
        log_model_seconds = time.perf_counter() - start
    per_epoch_tracker = timed.seconds / 2
    return {
        "tracker_seconds_per_epoch": per_epoch_tracker,
        "tracker_share_of_epoch": per_epoch_tracker / on["epoch_seconds"],
        "epoch_seconds_tracker_on": on["epoch_seconds"],
        "epoch_seconds_tracker_off": off["epoch_seconds"],
        "log_model_seconds": log_model_seconds,
    }


def startup_seconds(tmp: Path) -> float:
    """Process start -> first optimizer step of a real `kd-mlflow train nokd` (metric
    startup_seconds that the trainer logs)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/startup.db"}
    cmd = [sys.executable, "-m", "kd_mlflow", "train", "nokd", "--epochs", "1", "--train-subset", "512",
           "--val-size", "256", "--test-subset", "256", "--experiment", "startup"]
    subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True, text=True)
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("startup")
    run = client.search_runs([exp.experiment_id])[0]
    return run.data.metrics["startup_seconds"]


def peak_memory_mib() -> dict:
    to_mib = 1 / 1024  # ru_maxrss is KiB on Linux
    out = {"process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib,
           "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ------------------------------------------------------------------ GPU / CIFAR-shaped
def cifar_shaped(n: int, device) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    small = Split(x[:512], y[:512])
    return DataBundle(DATASETS["cifar10"], Split(x, y), small, small)


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--images", type=int, default=0, help="training images per epoch (default 12800; quick 512)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--cifar-shaped", action="store_true", help="GPU table: random 3x32x32 uint8 data")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    n = args.images or (512 if args.quick else 12800)
    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    cfg = Config.for_mode("kd", batch_size=args.batch_size, train_subset=n, val_size=256, test_subset=256,
                          device=args.device, precision=args.precision)
    result = {"device": str(device), "precision": "bf16" if amp is not None else "fp32",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "images_per_epoch": n,
              "batch_size": args.batch_size, "cpu": _cpu_name(), "modes": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    if args.cifar_shaped:
        data = cifar_shaped(n, device)
        for label, (t_arch, s_arch) in GPU_PAIRS.items():
            cfg_c = cfg.replace(dataset="cifar10")
            result["modes"][label] = {"package": package_epochs("kd", data, cfg_c, device, amp, NullTracker(),
                                                                student_arch=s_arch, teacher_arch=t_arch)}
    else:
        data = load_data(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            dataset = _torchvision_fashion_mnist(Path(tmp))
            for mode in MODES:
                pkg = package_epochs(mode, data, cfg, device, amp, NullTracker())
                ref = reference_epoch(mode, dataset, n, args.batch_size, args.workers)
                result["modes"][mode] = {"package": pkg, "reference_images_per_second": ref,
                                         "ratio": pkg["images_per_second"] / ref}
        with tempfile.TemporaryDirectory() as tmp:
            result["mlflow"] = mlflow_overheads(data, cfg, device, amp, Path(tmp))
            result["startup_seconds"] = startup_seconds(Path(tmp))
    result["memory"] = peak_memory_mib()
    _print_table(result)
    path = Path(args.json) if args.json else REPO / "bench" / "results" / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return result


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _print_table(r: dict) -> None:
    print(f"\ndevice {r['device']} ({r.get('gpu', r['cpu'])}), precision {r['precision']}, torch {r['torch']}, "
          f"{r['threads']} threads, {r['images_per_epoch']} images/epoch, batch {r['batch_size']}")
    print(f"{'mode':<24}{'package img/s':>15}{'reference img/s':>17}{'ratio':>8}")
    for mode, m in r["modes"].items():
        ref = m.get("reference_images_per_second")
        ref_text = f"{ref:.0f}" if ref else "-"
        ratio_text = f"{m['ratio']:.2f}x" if ref else "-"
        print(f"{mode:<24}{m['package']['images_per_second']:>15.0f}{ref_text:>17}{ratio_text:>8}")
    if "mlflow" in r:
        ml = r["mlflow"]
        print(f"MLflow tracker calls: {ml['tracker_seconds_per_epoch'] * 1000:.1f} ms/epoch = "
              f"{100 * ml['tracker_share_of_epoch']:.3f}% of a {ml['epoch_seconds_tracker_on']:.2f}s epoch "
              f"(epoch with tracker off: {ml['epoch_seconds_tracker_off']:.2f}s)")
        print(f"log_model: {ml['log_model_seconds']:.2f}s")
    if "startup_seconds" in r:
        print(f"process start -> first training step: {r['startup_seconds']:.2f}s")
    mem = r["memory"]
    print("peak memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items()))


if __name__ == "__main__":
    main()
