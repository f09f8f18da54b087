"""Throughput and overhead benchmark: the package's trainer against a plain reference loop.

    python bench/throughput.py                 # CPU, Fashion-MNIST, every mode, fp32 and bf16 (tens of minutes)
    python bench/throughput.py --modes rkd,oh  # CPU, only these modes' rows
    python bench/throughput.py --quick         # tiny smoke run (what the test suite runs)
    python bench/throughput.py --modes kd,rkd --repeats 3   # medians of 3 runs and the ratio's spread
    python bench/throughput.py --device cuda --cifar-shaped   # GPU: 3x32x32 inputs, batch sweep
    python bench/throughput.py --device cuda --cifar-shaped --compile --batch-sizes 1024
    python bench/throughput.py --accuracy-epochs 5          # test_acc: fp32 against --precision
    python bench/throughput.py --compile --images 6400      # CPU table rows with compile=true

It prints a table and writes JSON (``--json PATH``, default bench/results/<time>.json).

(a) the package: ``kd_mlflow.trainer.Trainer`` (device-resident uint8 data, batched crop
    on the device, channels_last, precision=auto, metrics read once per epoch);
(b) the reference: what most KD research code does: a torchvision dataset with
    per-sample PIL transforms, a DataLoader with 2 workers, the fp32 teacher run on
    every batch, a loss ``.item()`` per step; the loss written the way the method's
    public code writes it: rkd as RepDistiller's RKDLoss (torch pdist-style distances,
    F.normalize + bmm over all N^3 triplets) and DistillKL, oh as the overhaul authors'
    Distiller (connectors, margins from the teacher's BNs via scipy, their
    distillation_loss) — except that the teacher runs under no_grad, in eval mode.

The CPU table has a package row for every single-training ("distiller") mode of the
registry, resnet20 -> resnet8 (multikd: resnet20 + resnet14 -> resnet8); the modes with
a reference loop (nokd, kd, rkd, oh) also get its img/s and the ratio (a)/(b). Both
train the same models with the same optimizer on the same images for one epoch after a
warm-up (the package: its second epoch; ab's is its first KD epoch, after one epoch of
activation-boundary initialisation). Also measured: MLflow logging
cost as a share of an epoch (tracker calls timed on the training thread, and the same
epoch with the tracker on and off), ``log_model`` seconds, process start to first
training step (from a real ``kd-mlflow train`` subprocess), and peak memory.

GPU table (``--cifar-shaped``): random 3x32x32 uint8 images (throughput does not depend
on the pixels), kd resnet56 -> resnet20 and resnet18 -> resnet8 at each of
``--batch-sizes``; the reference loop (per-sample PIL crop/flip, 2 workers, pinned
memory, fp32 teacher, a ``.item()`` per step) at ``--batch-size``.

Accuracy (``--accuracy-epochs N``): kd resnet20 (the shipped pretrained teacher) ->
resnet8 on all of Fashion-MNIST for N epochs, once in fp32 and once in the precision
that ``--precision`` resolves to, same seed; prints both test accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import resource
import shutil
import statistics
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
from kd_mlflow.data import DATASETS, DataBundle, DeviceBatches, Split, load_data  # noqa: E402
from kd_mlflow.methods.kd.distiller import HintonKD  # noqa: E402
from kd_mlflow.methods.logits import hinton_kd_loss  # noqa: E402
from kd_mlflow.models import create_model  # noqa: E402
from kd_mlflow.modes import MODES  # noqa: E402
from kd_mlflow.tracking import NullTracker  # noqa: E402
from kd_mlflow.trainer import Trainer, resolve_device, resolve_precision  # noqa: E402

STUDENT, TEACHER, ENSEMBLE = "resnet8", "resnet20", ("resnet20", "resnet14")
REFERENCE_MODES = ("nokd", "kd", "rkd", "oh")  # the modes reference_loss writes
QUICK_MODES = REFERENCE_MODES
GPU_PAIRS = {"kd resnet56->resnet20": ("resnet56", "resnet20"), "kd resnet18->resnet8": ("resnet18", "resnet8")}


def distiller_modes() -> list[str]:
    """Every single-training mode of the registry, in its order."""
    return [name for name, mode in MODES.items() if mode.kind == "distiller"]


def teacher_archs(mode: str) -> tuple:
    return {"teacher": (TEACHER,), "ensemble": ENSEMBLE}.get(MODES[mode].teacher_source, ())


# Own parameters that differ from the defaults so that a row compares like with like:
# rkd's reference loop computes the angle term, which the default (distance only) skips.
LIKE_THE_REFERENCE = {"rkd": {"rkd_angle_weight": 50.0}}


def mode_config(cfg: Config, mode: str) -> Config:
    """``cfg``'s common fields with ``mode`` and that mode's own parameter defaults
    (but :data:`LIKE_THE_REFERENCE`)."""
    own = {p.name: p.default for p in MODES[mode].params}
    return cfg.replace(mode=mode, method={**own, **LIKE_THE_REFERENCE.get(mode, {})})


# ------------------------------------------------------------------ (b) reference
def _torchvision_fashion_mnist(root: Path, data_dir: str = ""):
    """torchvision's FashionMNIST over the Debian package's files (no download)."""
    import torchvision

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    src = Path(data_dir or os.environ.get("KD_DATA_DIR") or "/usr/share/datasets/fashion-mnist")
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


class PILImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per sample: uint8 array -> PIL image -> transforms."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, info):
        import torchvision.transforms as T

        self.x = x_uint8.permute(0, 2, 3, 1).numpy()  # N, H, W, C
        self.y = y.tolist()
        self.tf = T.Compose([T.RandomCrop(x_uint8.shape[-1], padding=info.crop_padding)]
                            + ([T.RandomHorizontalFlip()] if info.hflip else [])
                            + [T.ToTensor(), T.Normalize(info.mean, info.std)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        img = self.x[i]
        return self.tf(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)), self.y[i]


class DistillKL(torch.nn.Module):
    """RepDistiller's (HobbitLong/RepDistiller, distiller_zoo/KD.py) Hinton KD loss."""

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        p_s = F.log_softmax(y_s / self.T, dim=1)
        p_t = F.softmax(y_t / self.T, dim=1)
        return F.kl_div(p_s, p_t, reduction="sum") * (self.T ** 2) / y_s.shape[0]


class RKDLoss(torch.nn.Module):
    """RepDistiller's RKDLoss (distiller_zoo/RKD.py), as written there: distances from
    the Gram matrix, means over all N^2 pairs and all N^3 triplets."""

    def __init__(self, w_d=25, w_a=50):
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s, f_t):
        student = f_s.view(f_s.shape[0], -1)
        teacher = f_t.view(f_t.shape[0], -1)

        with torch.no_grad():  # RKD distance loss
            t_d = self.pdist(teacher, squared=False)
            mean_td = t_d[t_d > 0].mean()
            t_d = t_d / mean_td
        d = self.pdist(student, squared=False)
        mean_d = d[d > 0].mean()
        d = d / mean_d
        loss_d = F.smooth_l1_loss(d, t_d)

        with torch.no_grad():  # RKD angle loss
            td = (teacher.unsqueeze(0) - teacher.unsqueeze(1))
            norm_td = F.normalize(td, p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
        sd = (student.unsqueeze(0) - student.unsqueeze(1))
        norm_sd = F.normalize(sd, p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
        loss_a = F.smooth_l1_loss(s_angle, t_angle)

        return self.w_d * loss_d + self.w_a * loss_a

    @staticmethod
    def pdist(e, squared=False, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
        if not squared:
            res = res.sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res


def overhaul_distillation_loss(source, target, margin):
    """The overhaul authors' (clovaai/overhaul-distillation, CIFAR-100/distiller.py)
    partial L2, as written there."""
    target = torch.max(target, margin)
    loss = F.mse_loss(source, target, reduction="none")
    loss = loss * ((source > target) | (target > 0)).float()
    return loss.sum()


def overhaul_connector(t_channel, s_channel):
    C = [torch.nn.Conv2d(s_channel, t_channel, kernel_size=1, stride=1, padding=0, bias=False),
         torch.nn.BatchNorm2d(t_channel)]
    for m in C:
        if isinstance(m, torch.nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2. / n))
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
    return torch.nn.Sequential(*C)


def overhaul_margin_from_bn(bn):
    """The authors' get_margin_from_BN: per channel, with scipy's normal CDF."""
    from scipy.stats import norm

    margin = []
    std = bn.weight.data
    mean = bn.bias.data
    for (s, m) in zip(std, mean):
        s = abs(s.item())
        m = m.item()
        if norm.cdf(-m / s) > 0.001:
            margin.append(- s * math.exp(- (m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.FloatTensor(margin).to(std.device)


def reference_loss(mode: str, student, teacher, device):
    """-> (the trainable parameters, loss(x, y)) of ``mode`` in the reference loop."""
    if mode == "nokd":
        return list(student.parameters()), lambda x, y: F.cross_entropy(student(x), y)
    if mode == "kd":
        def kd(x, y):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            return 0.1 * F.cross_entropy(s, y) + 0.9 * hinton_kd_loss(s, t, 4.0)

        return list(student.parameters()), kd
    if mode == "rkd":  # RepDistiller's train_distill: gamma CE + alpha KL + beta RKD(last feature)
        criterion_div, criterion_kd = DistillKL(4.0), RKDLoss(25, 50)

        def rkd(x, y):
            with torch.no_grad():
                t = teacher.features(x)
            s = student.features(x)
            return (0.1 * F.cross_entropy(s.logits, y) + 0.9 * criterion_div(s.logits, t.logits)
                    + criterion_kd(s.embedding, t.embedding))

        return list(student.parameters()), rkd
    if mode == "oh":  # the authors' Distiller.forward and their CE + loss_distill / batch / 1000
        connectors = torch.nn.ModuleList(
            overhaul_connector(t, s) for t, s in zip(teacher.stage_channels, student.stage_channels)).to(device)
        margins = [overhaul_margin_from_bn(bn).unsqueeze(1).unsqueeze(2).unsqueeze(0).detach()
                   for bn in teacher.bn_before_relu()]

        def oh(x, y):
            with torch.no_grad():
                t_feats = teacher.features(x).stages
            s = student.features(x)
            feat_num = len(t_feats)
            loss_distill = 0
            for i in range(feat_num):
                loss_distill += overhaul_distillation_loss(connectors[i](s.stages[i]), t_feats[i].detach(),
                                                           margins[i]) / 2 ** (feat_num - i - 1)
            return F.cross_entropy(s.logits, y) + loss_distill.sum() / x.shape[0] / 1000

        return list(student.parameters()) + list(connectors.parameters()), oh
    raise ValueError(f"no reference loop for {mode!r}; these have one: {', '.join(REFERENCE_MODES)}")


def reference_epoch(mode: str, dataset, n_images: int, batch_size: int, workers: int, *, device=None,
                    teacher_arch=None, student_arch=None, num_classes: int = 10, in_channels: int = 1) -> float:
    """One epoch of the plain loop over the first ``n_images``; -> images/s."""
    teacher_arch = teacher_arch or (TEACHER if mode != "nokd" else None)
    device = torch.device(device or "cpu")
    torch.manual_seed(0)
    student = create_model(student_arch or STUDENT, num_classes, in_channels).to(device)
    teacher = create_model(teacher_arch, num_classes, in_channels).to(device).eval() if teacher_arch else None
    params, loss_of = reference_loss(mode, student, teacher, device)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    subset = torch.utils.data.Subset(dataset, range(n_images))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=False, pin_memory=device.type == "cuda")

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_of(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()  # what such loops do for their progress bar

    student.train()  # (oh's connectors train too: their BNs use batch statistics from the start)
    for i, (x, y) in enumerate(loader):  # warm-up: a few batches
        step(x, y)
        if i == 2:
            break
    synchronize(device)
    start = time.perf_counter()
    seen = 0
    for x, y in loader:
        step(x, y)
        seen += len(y)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
    """``epochs`` epochs of ``mode`` (its own parameters at their defaults, the rest from
    ``cfg``) with the package's trainer; -> the last epoch's numbers."""
    cfg = mode_config(cfg, mode).replace(epochs=epochs)  # e.g. ab splits its epochs into two phases
    cls = MODES[mode].load()
    info = data.info
    torch.manual_seed(0)
    student = create_model(student_arch or STUDENT, info.num_classes, info.in_channels)
    archs = (teacher_arch,) if teacher_arch else teacher_archs(mode)
    teachers = [create_model(arch, info.num_classes, info.in_channels) for arch in archs]
    distiller = cls(student, teachers, cfg)
    data = cls.adapt_data(data, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(distiller, data, cfg, device=device, amp_dtype=amp,
                          tracker=tracker, workdir=Path(tmp), epochs=epochs, progress_desc=f"bench {mode}")
        fit = trainer.fit()
    last = fit.history[-1]  # epoch 0 is the warm-up (allocator, oneDNN/cuDNN autotuning)
    return {"images_per_second": last["images_per_second"], "epoch_seconds": last["epoch_seconds"],
            "train_loss": last["train_loss"], "pair": f"{'+'.join(archs) or 'no teacher'} -> {student_arch or STUDENT}"}


def median_run(runs: list[dict]) -> dict:
    """The run of median img/s among ``runs`` (the lower one of an even count), with every
    run's img/s under "runs" when there is more than one."""
    ordered = sorted(runs, key=lambda r: r["images_per_second"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        chosen["runs"] = [r["images_per_second"] for r in runs]
    return chosen


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


def startup_seconds(tmp: Path) -> dict:
    """Process start -> first optimizer step of a real `kd-mlflow train nokd` (the metric
    startup_seconds that the trainer logs): first with a fresh SQLite store (its
    migrations are paid once per store), then again with that store existing (every
    later run, and every `mlflow run`, which creates the store before the entry point)."""
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/startup.db"}
    cmd = [sys.executable, "-m", "kd_mlflow", "train", "nokd", "--epochs", "1", "--train-subset", "512",
           "--val-size", "256", "--test-subset", "256", "--experiment", "startup"]
    for _ in ("fresh_store", "existing_store"):
        subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True, text=True)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("startup")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return {"fresh_store": runs[0].data.metrics["startup_seconds"],
            "existing_store": runs[1].data.metrics["startup_seconds"]}


def peak_memory_mib() -> dict:
    to_mib = 1 / 1024  # ru_maxrss is KiB on Linux
    out = {"process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib,
           "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ------------------------------------------------------------------ GPU / CIFAR-shaped
def cifar_shaped(n: int) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    small = Split(x[:512], y[:512])
    return DataBundle(DATASETS["cifar10"], Split(x, y), small, small)


def cifar_shaped_table(args, cfg: Config, device, amp, n: int, result: dict, save) -> None:
    data = cifar_shaped(n)
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [128, 512, 1024]
    reference_data = PILImages(data.train.x[:args.reference_images], data.train.y[:args.reference_images],
                               data.info)
    for label, (t_arch, s_arch) in GPU_PAIRS.items():
        if args.pairs and not any(p in label for p in args.pairs.split(",")):
            continue
        for bs in sizes:
            cfg_c = cfg.replace(dataset="cifar10", batch_size=bs, compile=args.compile)
            row = {"batch_size": bs, "compile": args.compile,
                   "package": package_epochs("kd", data, cfg_c, device, amp, NullTracker(),
                                             student_arch=s_arch, teacher_arch=t_arch)}
            if bs == args.batch_size and not args.compile and not args.no_reference:
                ref = reference_epoch("kd", reference_data, len(reference_data), bs, args.workers, device=device,
                                      teacher_arch=t_arch, student_arch=s_arch, in_channels=3)
                row.update(reference_images_per_second=ref, ratio=row["package"]["images_per_second"] / ref)
            result["modes"][f"{label} b{bs}{' compile' if args.compile else ''}"] = row
            save(result)


# ------------------------------------------------------------------ accuracy: fp32 against reduced precision
def accuracy_check(epochs: int, device, amp, data_dir: str = "") -> dict:
    """kd resnet20 (pretrained) -> resnet8 on all of Fashion-MNIST for ``epochs`` epochs,
    in fp32 and in ``amp``; -> test accuracies."""
    from kd_mlflow.teachers import load_teacher, teacher_source
    from kd_mlflow.trainer import evaluate, seed_everything

    cfg = Config.for_mode("kd", epochs=epochs, data_dir=data_dir)
    data = load_data(cfg)
    test = DeviceBatches(data.test, data.info, 512, device=device, shuffle=False, augment=False)
    out = {"schedule": f"kd resnet20 -> resnet8, Fashion-MNIST, {len(data.train.y)} train images, "
                       f"{epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr} {cfg.scheduler}"}
    precisions = {"fp32": None} | ({"bf16": amp} if amp is not None else {})
    for name, dtype in precisions.items():
        seed_everything(cfg.seed)
        teacher, _ = load_teacher(teacher_source(cfg), cfg)
        student = create_model(cfg.student, data.info.num_classes, data.info.in_channels)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            Trainer(HintonKD(student, [teacher], cfg), data, cfg, device=device, amp_dtype=dtype,
                    tracker=NullTracker(), workdir=Path(tmp), progress_desc=f"accuracy {name}").fit()
            seconds = time.perf_counter() - start
        acc, _ = evaluate(student, test, dtype)
        out[name] = {"test_acc": acc, "train_seconds": seconds}
    if "bf16" in out:
        out["bf16_minus_fp32_points"] = out["bf16"]["test_acc"] - out["fp32"]["test_acc"]
    return out


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--modes", default="",
                    help="CPU table: comma-separated modes (default: every distiller mode; quick: "
                         + ",".join(QUICK_MODES) + ")")
    ap.add_argument("--images", type=int, default=0,
                    help="training images per epoch (default 12800, --cifar-shaped 51200; quick 256)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    ap.add_argument("--repeats", type=int, default=1,
                    help="CPU table: measure each row this many times, the package and the reference in turn; "
                         "the table gives medians and the spread of the ratio")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--cifar-shaped", action="store_true", help="GPU table: random 3x32x32 uint8 data")
    ap.add_argument("--batch-sizes", default="", help="--cifar-shaped: comma-separated (default 128,512,1024)")
    ap.add_argument("--pairs", default="", help="--cifar-shaped: only pairs whose label contains one of these")
    ap.add_argument("--compile", action="store_true", help="the package with compile=true (table rows only)")
    ap.add_argument("--reference-images", type=int, default=12800, help="--cifar-shaped: reference loop epoch")
    ap.add_argument("--no-reference", action="store_true", help="--cifar-shaped: skip the reference loop")
    ap.add_argument("--accuracy-epochs", type=int, default=0,
                    help="only the accuracy check: kd on all of Fashion-MNIST, fp32 against --precision")
    ap.add_argument("--data-dir", default="", help="Fashion-MNIST directory (else $KD_DATA_DIR, the Debian package)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.repeats > 1 and (args.cifar_shaped or args.accuracy_epochs):
        ap.error("--repeats applies to the CPU table only; leave it out with --cifar-shaped or --accuracy-epochs")
    n = args.images or (256 if args.quick else 51200 if args.cifar_shaped else 12800)
    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    cfg = Config.for_mode("kd", batch_size=args.batch_size, train_subset=n, val_size=256, test_subset=256,
                          device=args.device, precision=args.precision, data_dir=args.data_dir)
    result = {"device": str(device), "precision": "bf16" if amp is not None else "fp32",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "images_per_epoch": n,
              "batch_size": args.batch_size, "cpu": _cpu_name(), "repeats": args.repeats, "modes": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    path = Path(args.json) if args.json else REPO / "bench" / "results" / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(r: dict) -> None:  # after every row: a run cut short keeps what it measured
        path.write_text(json.dumps(r, indent=2))

    if args.accuracy_epochs:
        result["accuracy"] = accuracy_check(args.accuracy_epochs, device, amp, args.data_dir)
    elif args.cifar_shaped:
        cifar_shaped_table(args, cfg, device, amp, n, result, save)
    else:
        modes = args.modes.split(",") if args.modes else list(QUICK_MODES if args.quick else distiller_modes())
        unknown = [m for m in modes if m not in distiller_modes()]
        if unknown:
            ap.error(f"not single-training modes: {', '.join(unknown)}; choose from {', '.join(distiller_modes())}")
        data = load_data(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            dataset = _torchvision_fashion_mnist(Path(tmp), args.data_dir)
            for mode in modes:
                # Both precisions, so that what `auto` picks (result["precision"]) can be
                # re-checked on any machine: its row must be the faster one (--quick: kd's
                # row only; emulated bf16 is up to 10x slower than fp32).
                both = not args.quick or mode == "kd"
                precisions = [(name, dtype) for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))
                              if both or name == result["precision"]]
                # --repeats: the package and the reference measured in turn, so that both
                # see the machine in the same state; each row keeps every run and the median.
                runs = {name: [] for name, _ in precisions}
                refs = []
                for _ in range(args.repeats):
                    for name, dtype in precisions:
                        runs[name].append(package_epochs(mode, data, cfg.replace(compile=args.compile), device,
                                                         dtype, NullTracker()))
                    if mode in REFERENCE_MODES:
                        refs.append(reference_epoch(mode, dataset, n, args.batch_size, args.workers, device=device))
                row = {f"package_{name}": median_run(runs[name]) for name, _ in precisions}
                row["package"] = row[f"package_{result['precision']}"]
                if refs:
                    ref = statistics.median_low(refs)  # as median_run: a measured value, never a mean of two
                    row.update(reference_images_per_second=ref, ratio=row["package"]["images_per_second"] / ref)
                    if args.repeats > 1:
                        row.update(reference_runs=refs,
                                   ratio_runs=[p / r for p, r in zip(row["package"]["runs"], refs)])
                result["modes"][mode + (" compile" if args.compile else "")] = row
                save(result)
        if not args.compile:  # with --compile, the table rows only: the overheads are the default run's
            with tempfile.TemporaryDirectory() as tmp:
                result["mlflow"] = mlflow_overheads(data, cfg, device, amp, Path(tmp))
                result["startup_seconds"] = startup_seconds(Path(tmp))
    result["memory"] = peak_memory_mib()
    _print_table(result)
    save(result)
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
    both = any("package_fp32" in m for m in r["modes"].values())
    if r["modes"]:
        head = f"{'fp32 img/s':>12}{'bf16 img/s':>12}{'auto/other':>12}" if both else ""
        spread = r.get("repeats", 1) > 1
        print(f"{'mode':<44}{head}{'package img/s':>15}{'reference img/s':>17}{'ratio':>8}"
              + (f"{'ratio range':>14}" if spread else ""))
        if spread:
            print(f"(medians of {r['repeats']} runs, the package and the reference in turn; ratio range: the lowest "
                  f"and highest of the runs' own ratios)")
        if both:
            print(f"(package img/s: precision=auto, which picks {r['precision']} here; auto/other: its img/s "
                  f"over the other precision's)")
    for mode, m in r["modes"].items():
        ref = m.get("reference_images_per_second")
        ref_text = f"{ref:.0f}" if ref else "-"
        ratio_text = f"{m['ratio']:.2f}x" if ref else "-"
        label = mode if " " in mode else f"{mode} ({m['package']['pair']})"  # GPU rows name their pair
        cols = f"{'-':>12}{'-':>12}{'-':>12}" if both else ""
        if "package_fp32" in m and "package_bf16" in m:
            fp32, bf16 = m["package_fp32"]["images_per_second"], m["package_bf16"]["images_per_second"]
            other = bf16 if r["precision"] == "fp32" else fp32
            cols = f"{fp32:>12.0f}{bf16:>12.0f}{m['package']['images_per_second'] / other:>11.2f}x"
        ratios = m.get("ratio_runs")
        range_text = f"{min(ratios):>8.2f}-{max(ratios):.2f}x" if ratios else ""
        print(f"{label:<44}{cols}{m['package']['images_per_second']:>15.0f}{ref_text:>17}{ratio_text:>8}{range_text}")
    if "mlflow" in r:
        ml = r["mlflow"]
        print(f"MLflow tracker calls: {ml['tracker_seconds_per_epoch'] * 1000:.1f} ms/epoch = "
              f"{100 * ml['tracker_share_of_epoch']:.3f}% of a {ml['epoch_seconds_tracker_on']:.2f}s epoch "
              f"(epoch with tracker off: {ml['epoch_seconds_tracker_off']:.2f}s)")
        print(f"log_model: {ml['log_model_seconds']:.2f}s")
    if "startup_seconds" in r:
        st = r["startup_seconds"]
        print(f"process start -> first training step: {st['existing_store']:.2f}s with an existing SQLite store, "
              f"{st['fresh_store']:.2f}s with a fresh one (its migrations)")
    if "accuracy" in r:
        acc = r["accuracy"]
        print(f"accuracy ({acc['schedule']}):")
        for name in ("fp32", "bf16"):
            if name in acc:
                print(f"  {name}: test_acc {acc[name]['test_acc']:.2f}% ({acc[name]['train_seconds']:.1f}s)")
        if "bf16_minus_fp32_points" in acc:
            print(f"  bf16 - fp32: {acc['bf16_minus_fp32_points']:+.2f} points")
    mem = r["memory"]
    print("peak memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items()))


if __name__ == "__main__":
    main()
