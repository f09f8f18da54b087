"""Where a training step's time goes: host (Python + dispatch) or device (kernels).

    python bench/profile_step.py --device cuda --teacher resnet56 --student resnet20 --batch-sizes 128,1024
    python bench/profile_step.py --device cpu --fashion-mnist --mode rkd --teacher resnet20 --student resnet8 \
        --batch-sizes 128 --images 3840

--mode: any single-training mode, with its own parameters as bench/throughput.py sets them
(rkd with the angle term, like its reference loop); --fashion-mnist: the CPU table's data
instead of CIFAR-shaped random images.

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
from kd_mlflow.data import load_data  # noqa: E402
from kd_mlflow.models import create_model  # noqa: E402
from kd_mlflow.modes import MODES  # noqa: E402
from kd_mlflow.tracking import NullTracker  # noqa: E402
from kd_mlflow.trainer import Trainer, resolve_device, resolve_precision  # noqa: E402
from throughput import cifar_shaped, mode_config, synchronize, teacher_archs  # noqa: E402


def make_trainer(args, bs, n, device, amp, tmp):
    if args.fashion_mnist:
        cfg = Config.for_mode("kd", batch_size=bs, epochs=1, compile=args.compile, train_subset=n,
                              val_size=256, test_subset=256)
        data = load_data(cfg)
    else:
        cfg = Config.for_mode("kd", dataset="cifar10", batch_size=bs, epochs=1, compile=args.compile)
        data = cifar_shaped(n)
    cfg = mode_config(cfg, args.mode)
    cls = MODES[args.mode].load()
    info = data.info
    torch.manual_seed(0)
    student = create_model(args.student, info.num_classes, info.in_channels)
    archs = (args.teacher,) if MODES[args.mode].teacher_source == "teacher" else teacher_archs(args.mode)
    teachers = [create_model(arch, info.num_classes, info.in_channels) for arch in archs]
    distiller = cls(student, teachers, cfg)
    return Trainer(distiller, cls.adapt_data(data, cfg), cfg, device=device, amp_dtype=amp,
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
    ap.add_argument("--mode", default="kd", help="a single-training mode (an ensemble mode: the CPU table's teachers)")
    ap.add_argument("--fashion-mnist", action="store_true", help="Fashion-MNIST (the CPU table's data)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    print(f"{args.mode}: device {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} "
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
