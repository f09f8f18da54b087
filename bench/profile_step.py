"""Where a training step's time goes: host (Python + dispatch) or device (kernels).

    python bench/profile_step.py --device cuda --teacher resnet56 --student resnet20 --batch-sizes 128,1024

For each batch size: images/s of the package's trainer (bf16/fp32 as --precision says)
with the normal data path and with augmentation off, then one profiled epoch; it prints
the wall time per step, the summed kernel time per step (device busy), and the top ops
by device time and by host time. A step whose wall time is far above its kernel time is
host-bound (more batch or CUDA graphs help); one close to it is device-bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from kd_mlflow.config import Config  # noqa: E402
from kd_mlflow.methods.kd.distiller import HintonKD  # noqa: E402
from kd_mlflow.models import create_model  # noqa: E402
from kd_mlflow.tracking import NullTracker  # noqa: E402
from kd_mlflow.trainer import Trainer, resolve_device, resolve_precision  # noqa: E402
from throughput import cifar_shaped, synchronize  # noqa: E402


def make_trainer(args, bs, n, device, amp, tmp):
    data = cifar_shaped(n)
    cfg = Config.for_mode("kd", dataset="cifar10", batch_size=bs, epochs=1, compile=args.compile)
    torch.manual_seed(0)
    student = create_model(args.student, 10, 3)
    teacher = create_model(args.teacher, 10, 3)
    return Trainer(HintonKD(student, [teacher], cfg), data, cfg, device=device, amp_dtype=amp,
                   tracker=NullTracker(), workdir=Path(tmp), epochs=1, progress_desc="profile")


def timed_epoch(trainer) -> float:
    _, _, seconds = trainer._train_epoch(0, False)
    return trainer.train_batches.num_images / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--batch-sizes", default="128,1024")
    ap.add_argument("--images", type=int, default=20480)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    print(f"device {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} "
          f"precision {'bf16' if amp is not None else 'fp32'} torch {torch.__version__}")
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            tr = make_trainer(args, bs, args.images, device, amp, tmp)
            timed_epoch(tr)  # warm-up (cuDNN autotuning, compile)
            normal = timed_epoch(tr)
            tr.train_batches.augment = False
            no_aug = timed_epoch(tr)
            tr.train_batches.augment = True
            steps = len(tr.train_batches)
            synchronize(device)
            start = time.perf_counter()
            for _ in tr.train_batches:  # the data path alone
                pass
            synchronize(device)
            data_ms = 1000 * (time.perf_counter() - start) / steps
            with torch.profiler.profile(activities=activities) as prof:
                start = time.perf_counter()
                timed_epoch(tr)
                wall = time.perf_counter() - start
            events = prof.key_averages()
            dev_us = sum(e.device_time_total for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA)
            print(f"\n=== batch {bs}: {normal:.0f} img/s, without augmentation {no_aug:.0f} img/s; profiled: "
                  f"wall {1000 * wall / steps:.2f} ms/step, kernels {dev_us / 1000 / steps:.2f} ms/step, "
                  f"data path alone {data_ms:.2f} ms/step")
            if device.type == "cuda":
                print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
