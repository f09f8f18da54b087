"""Image-folder throughput: kd-mlflow's streaming path against a plain DataLoader loop.

    python bench/throughput_imagefolder.py                       # 64x64 and 224x224, 2,000 JPEGs each
    python bench/throughput_imagefolder.py --quick               # tiny smoke run
    python bench/throughput_imagefolder.py --device cuda --train tv-resnet50,tv-resnet18

A generated image folder (5 classes of JPEGs, quality 90, at each ``--sizes`` side; the
model input is the same side) is read for one training epoch, after one warm-up epoch:

(a) streaming: kd_mlflow's StreamBatches (data_loading=stream): the seeded per-image
    RandomResizedCrop + flip in DataLoader workers, uint8 batches (pinned on CUDA),
    normalised on the device;
(b) reference: the plain loop most code writes: torchvision.datasets.ImageFolder with
    v2 RandomResizedCrop + RandomHorizontalFlip + PILToTensor, a DataLoader with the same
    workers, batch size and pinning, the same normalisation on the device;
(c) in memory: the path image folders that fit take (decode once, crop on the device);
    its one-off decode time is reported apart.

With ``--train TEACHER,STUDENT`` each row also runs a kd step (frozen teacher forward,
student forward/backward, SGD) on every batch, so the number is training img/s. The
device is named in the output (on CUDA: the card). Prints a table; writes JSON
(``--json PATH``, default bench/results/imagefolder-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kd_mlflow.config import Config  # noqa: E402
from kd_mlflow.data import DeviceBatches, load_data  # noqa: E402
from kd_mlflow.data.imagefolder import loader_workers  # noqa: E402
from kd_mlflow.trainer import resolve_device  # noqa: E402


def make_folder(root: Path, size: int, images: int, seed: int = 0) -> Path:
    """root/{train,test}/<class>/*.jpg: smooth random colour fields (JPEG-typical content)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    per_class = max(2, images // 5)
    for split, count in (("train", per_class), ("test", max(2, per_class // 10))):
        for c in range(5):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return root


def _kd_step(models, optimizer):
    if models is None:
        return None
    teacher, student = models

    def step(x, y):
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _timed_epoch(batches, step, device) -> float:
    """img/s of one pass over ``batches`` ((x, y) on the device), after a warm-up pass."""
    for _ in range(2):
        start, n = time.perf_counter(), 0
        for x, y, *_ in batches:
            if step is not None:
                step(x, y)
            n += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return n / seconds


class ReferenceLoop:
    """torchvision ImageFolder + v2 transforms + DataLoader, normalised on the device."""

    def __init__(self, root: Path, size: int, batch_size: int, workers: int, device, mean, std):
        import torchvision
        from torchvision.transforms import v2

        transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                                v2.PILToTensor()])
        dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                                  pin_memory=device.type == "cuda", drop_last=True,
                                                  prefetch_factor=4 if workers else None)
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __iter__(self):
        for x, y in self.loader:
            x = (x.to(self.device, non_blocking=True).float() - self.mean) / self.std
            yield x.contiguous(memory_format=torch.channels_last), y.to(self.device, non_blocking=True)


def measure(size: int, images: int, batch_size: int, workers: int, device, train: str, root: Path) -> dict:
    folder = make_folder(root / f"s{size}", size, images)
    os.environ["KD_DATA_WORKERS"] = str(workers)
    row = {"size": size, "images": images, "batch_size": batch_size, "workers": workers}
    models, optimizer = None, None
    if train:
        from kd_mlflow.models import create_model

        teacher_name, student_name = train.split(",")
        teacher = create_model(teacher_name, 5, 3).to(device).eval().to(memory_format=torch.channels_last)
        student = create_model(student_name, 5, 3).to(device).train().to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        models = (teacher, student)
        row["train"] = train
    step = _kd_step(models, optimizer)
    base = {"dataset": "imagefolder", "data_dir": str(folder), "image_size": size, "val_size": 2,
            "device": str(device), "student": "resnet8"}
    streamed = load_data(Config.for_mode("nokd", data_loading="stream", **base))
    batches = DeviceBatches(streamed.train, streamed.info, batch_size, device=device, shuffle=True, augment=True)
    row["streaming_images_per_second"] = _timed_epoch(batches, step, device)
    reference = ReferenceLoop(folder, size, batch_size, workers, device, streamed.info.mean, streamed.info.std)
    row["reference_images_per_second"] = _timed_epoch(reference, step, device)
    start = time.perf_counter()
    memory = load_data(Config.for_mode("nokd", data_loading="memory", **base))
    row["in_memory_decode_seconds"] = time.perf_counter() - start
    batches = DeviceBatches(memory.train, memory.info, batch_size, device=device, shuffle=True, augment=True)
    row["in_memory_images_per_second"] = _timed_epoch(batches, step, device)
    row["streaming_over_reference"] = row["streaming_images_per_second"] / row["reference_images_per_second"]
    return row


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (sizes 64,224; 50 images)")
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--images", type=int, default=2000, help="training images per size")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers of both loops (-1: kd-mlflow's rule)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train", default="", help="TEACHER,STUDENT: a kd step on every batch, e.g. tv-resnet50,tv-resnet18")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.batch_size = 50, 16
    device = resolve_device(args.device)
    workers = loader_workers() if args.workers < 0 else args.workers
    result = {"device": device_name(device), "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            result["rows"].append(measure(size, args.images, args.batch_size, workers, device, args.train, Path(tmp)))
    print(f"image-folder throughput on {result['device']}" + (f", kd {args.train}" if args.train else ", data only"))
    print(f"{'size':>5} {'images':>7} {'workers':>7} {'streaming':>10} {'reference':>10} {'ratio':>6} "
          f"{'in memory':>10} {'decode s':>9}")
    for r in result["rows"]:
        print(f"{r['size']:>5} {r['images']:>7} {r['workers']:>7} {r['streaming_images_per_second']:>10.0f} "
              f"{r['reference_images_per_second']:>10.0f} {r['streaming_over_reference']:>6.2f} "
              f"{r['in_memory_images_per_second']:>10.0f} {r['in_memory_decode_seconds']:>9.1f}")
    out = Path(args.json) if args.json else REPO / "bench" / "results" / f"imagefolder-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
