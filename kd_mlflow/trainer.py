"""The one training loop. It knows no mode (the Distiller supplies the losses) and no
MLflow (it reports to a tracker with ``log_metrics``).

Hot-loop rules: nothing forces a device sync per step. Loss terms and accuracy are
accumulated on the device and read once per epoch; the progress bar counts batches.

Data-parallel (torchrun, see kd_mlflow/distributed/): each rank trains on its shard of every
global batch through DistributedDataParallel; the epoch's sums are all-reduced in the
same one read per epoch, so every rank sees the same metrics, the same best epoch and
the same NaN verdict. Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .checkpoint import atomic_save
from .config import Config, ConfigError
from .data import DataBundle, DeviceBatches


class NonFiniteLoss(RuntimeError):
    pass


_IMPORTED_AT = time.time()


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since import)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED_AT


# ------------------------------------------------------------------ runtime
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use -P device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but MPS is not available here; use -P device=auto or cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device):
    """-> autocast dtype, or None for fp32."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if name == "bf16":
            raise ConfigError("precision=bf16 but this GPU has no bf16 support; use -P precision=fp32")
        return None
    if device.type == "cpu":
        # On CPUs without native bf16 (no AVX512-BF16/AMX) oneDNN emulates it; "auto"
        # keeps fp32 there, an explicit "bf16" is honoured.
        if name == "bf16" or _cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if name == "bf16":
        raise ConfigError(f"precision=bf16 is not supported on {device.type}; use -P precision=fp32")
    return None


def _cpu_has_native_bf16() -> bool:
    # KD_CPU_NATIVE_BF16=0/1 overrides the detection: how the suite is checked, on one
    # machine, as it runs on a CPU kind with (1) and without (0) native bf16.
    forced = os.environ.get("KD_CPU_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    # The instructions themselves, not oneDNN's "bf16 supported": oneDNN says yes on any
    # AVX-512 core (e.g. Intel Ice Lake) and emulates bf16 there, which trained kd at
    # 375-400 img/s against 580 in fp32 (bench/throughput.py, 2-core Xeon, model 106).
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


def cpu_kind() -> str:
    """What a CPU run's numbers depend on beyond the code: the kernels torch picks
    (ATen's capability) and whether bf16 is native, e.g. 'AVX512 bf16=native amx'."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = "unknown"
    flags = [f"bf16={'native' if _cpu_has_native_bf16() else 'emulated'}"]
    try:
        if torch.cpu._is_amx_tile_supported():
            flags.append("amx")
    except Exception:
        pass
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if onednn:
        flags.append(f"onednn<={onednn}")
    return " ".join([capability, *flags])


def resolve_threads(requested: int, local_processes: int = 1) -> int:
    """torch intra-op threads for a run: ``requested``, or (0) the physical cores this
    process may use, shared out among the ``local_processes`` of a data-parallel run.

    Deliberately not torch's current setting: that is whatever the launcher left (torchrun
    and Ray set OMP_NUM_THREADS, a pool may have lowered it), and a CPU run's numbers
    change with the thread count."""
    if requested > 0:
        return requested
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(allowed, physical) // max(1, local_processes))


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch.set_num_threads(n) for the block, then back to what it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def build_optimizer(params, cfg: Config, device: torch.device | None = None):
    # On CUDA the fused kernels update every parameter in one or two launches instead of
    # several per tensor group (per-step host overhead dominates small ResNets on a GPU).
    # On CPU the default (for-each) implementation is kept: its numbers are the ones the
    # bit-exact resume tests pin.
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if cfg.optimizer_used == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr_used, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay, **fused)
        if fused and cfg.momentum > 0:
            # The fused kernel refuses a step where some parameters have a momentum buffer and
            # others not yet (ab: its first phase leaves the classifier without gradients). A
            # zero buffer is the same first step (dampening 0: momentum * 0 + grad = grad).
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    return torch.optim.AdamW(params, lr=cfg.lr_used, weight_decay=cfg.weight_decay, **fused)


def build_scheduler(optimizer, cfg: Config, epochs: int):
    if cfg.scheduler == "multistep":
        milestones = sorted({max(1, round(epochs / 3)), max(1, round(2 * epochs / 3))})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# ------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: DeviceBatches, amp_dtype=None) -> tuple[float, float]:
    """-> (accuracy in %, mean cross-entropy) of ``model`` over ``batches`` (over every
    rank's shard of them when ``batches`` is sharded: the same numbers on every rank)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=batches.device)  # correct, summed loss, images (exact in fp32 < 2^24)
    # A model compiled with CUDA graphs (compile=true on CUDA) gets a new graph step per
    # batch; for any other model this is skipped (it would import torch._inductor).
    cuda_graphs = batches.device.type == "cuda" and getattr(model, "_compiled_call_impl", None) is not None
    with autocast(batches.device, amp_dtype):
        for x, y in batches:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = model(x).float()
            totals[0] += (logits.argmax(1) == y).sum()
            totals[1] += F.cross_entropy(logits, y, reduction="sum")
            totals[2] += len(y)
    model.train(was_training)
    correct, loss, n = distributed.all_reduce_sum(totals).tolist()
    return 100.0 * correct / max(n, 1), loss / max(n, 1)


def exported_test_batches(data: DataBundle) -> DeviceBatches:
    """The test split as a user's exported model sees it: on CPU, contiguous, in order,
    unaugmented (what count_correct's numbers are measured on)."""
    return DeviceBatches(data.test, data.info, 500, device="cpu", shuffle=False, augment=False,
                         channels_last=False)


@torch.inference_mode()
def count_correct(model: torch.nn.Module, batches: DeviceBatches) -> tuple[int, int]:
    """-> (correct images, images) of ``model`` in fp32 and eval mode over unsharded
    ``batches``: the number a user reproduces with the exported model."""
    was_training = model.training
    model.eval()
    correct, n = 0, 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return correct, n


# ------------------------------------------------------------------ fitting
@dataclass
class FitResult:
    best_val_acc: float
    best_epoch: int
    best_student_state: dict
    history: list = field(default_factory=list)  # one metrics dict per epoch
    last_student_state: dict = field(default_factory=dict)  # the last epoch's student (test_acc_last)


class Trainer:
    def __init__(self, distiller, data: DataBundle, cfg: Config, *, device: torch.device, amp_dtype,
                 tracker, workdir: Path, epochs: int | None = None, progress_desc: str = ""):
        self.distiller = distiller.to(device).to(memory_format=torch.channels_last)
        self.data = data
        self.cfg = cfg
        self.device = device
        self.amp_dtype = amp_dtype
        self.tracker = tracker
        self.workdir = Path(workdir)
        self.epochs = epochs or cfg.epochs
        self.desc = progress_desc or cfg.mode
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        shard = {"rank": self.rank, "world_size": self.world_size}
        # A method with per-sample state (CRD's memory bank) also gets each image's row in
        # data.train, as forward(x, y, index=rows); the batches are the same either way.
        self.train_batches = DeviceBatches(data.train, data.info, cfg.batch_size, device=device,
                                           shuffle=True, augment=True, seed=cfg.seed,
                                           with_indices=distiller.wants_indices, **shard)
        self.val_batches = DeviceBatches(data.val, data.info, max(cfg.batch_size, 256), device=device,
                                         shuffle=False, augment=False, **shard)
        self.cuda_graphs = bool(cfg.compile) and device.type == "cuda"
        if cfg.compile:
            # In place (nn.Module.compile) so state_dict keys stay those of the plain model.
            # On CUDA with CUDA graphs (mode reduce-overhead): a small ResNet's step is
            # bound by launching its hundreds of kernels one by one from Python, not by
            # the GPU (bench/profile_step.py); a replayed graph launches them at once.
            mode = "reduce-overhead" if self.cuda_graphs else None
            for module in (distiller.student, *distiller.teachers):
                module.compile(mode=mode)
        # The module a training step calls: the distiller, or DDP around it (state dicts
        # are always taken from the distiller, so their keys never depend on world size).
        self.step_module, self._global_bns = distributed.wrap(self.distiller, device)
        self.stop_vote = distributed.StopVote()  # ranks stop on a signal at the same step
        if device.type == "cuda":
            # cuDNN picks the fastest convolution per shape once (every batch has the same
            # shape here). GPU runs are reproducible to rounding, not bit for bit.
            torch.backends.cudnn.benchmark = True
        self.optimizer = build_optimizer(distiller.trainable_parameters(), cfg, device)
        self.startup_seconds: float | None = None
        self.scheduler = build_scheduler(self.optimizer, cfg, self.epochs)

    def fit(self, resume_state: dict | None = None) -> FitResult:
        """Train ``epochs`` epochs (or the rest of them, continuing ``resume_state``, a
        checkpoint written by ``_checkpoint``) and return the best-validation student."""
        student = self.distiller.student
        best = FitResult(-1.0, -1, {}, [])
        self.distiller.on_fit_start(self)
        first_epoch = 0
        info = self.data.info
        if info.class_names and resume_state is None:
            # An image folder's facts are known once it is read: its classes, and the
            # unreadable images left out (data/imagefolder.py).
            self.tracker.set_tags({"class_names": ",".join(info.class_names)[:5000],
                                   "num_classes": str(info.num_classes)})
            self.tracker.log_metrics({"skipped_images": info.skipped_images}, step=0)
        if resume_state is not None:
            best = self._restore(resume_state)
            first_epoch = resume_state["epoch"] + 1
            # A process killed just after an epoch's checkpoint may not have delivered that
            # epoch's metrics (they are sent in the background): fill the hole from the history.
            self.tracker.backfill(best.history)
        interactive = sys.stderr.isatty() and self.rank == 0
        try:
            self._fit_epochs(best, first_epoch, interactive)
        finally:
            distributed.revert_batchnorm(self._global_bns)  # the trained student is a plain network again
        best.last_student_state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        student.load_state_dict(best.best_student_state)
        return best

    def _fit_epochs(self, best: FitResult, first_epoch: int, interactive: bool) -> None:
        student = self.distiller.student
        for epoch in range(first_epoch, self.epochs):
            start = time.perf_counter()
            terms, train_acc, train_seconds = self._train_epoch(epoch, interactive)
            val_acc, val_loss = evaluate(student, self.val_batches, self.amp_dtype)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            metrics = {"train_loss": sum(terms.values()), **{f"loss_{k}": v for k, v in terms.items()},
                       "train_acc": train_acc, "val_acc": val_acc, "val_loss": val_loss, "lr": lr,
                       "images_per_second": self.train_batches.num_images / train_seconds}
            if val_acc > best.best_val_acc:
                best.best_val_acc, best.best_epoch = val_acc, epoch
                best.best_student_state = copy.deepcopy({k: v.detach().cpu() for k, v in student.state_dict().items()})
            metrics["epoch_seconds"] = time.perf_counter() - start
            if epoch == 0 and self.startup_seconds is not None:
                metrics["startup_seconds"] = self.startup_seconds  # process start -> first step done
            best.history.append(metrics)
            # Logged before the checkpoint: a crash in between re-runs this epoch on resume
            # (same numbers on CPU) rather than leaving a hole in the metric history.
            self.tracker.log_metrics(metrics, step=epoch)
            if self.rank == 0:
                self._checkpoint(epoch, best)
                line = (f"[{self.desc}] epoch {epoch + 1}/{self.epochs} loss {metrics['train_loss']:.4f} "
                        f"train_acc {train_acc:.2f} val_acc {val_acc:.2f} "
                        f"({metrics['images_per_second']:.0f} img/s, {metrics['epoch_seconds']:.1f}s)")
                tqdm.write(line, file=sys.stderr)

    def _train_epoch(self, epoch: int, interactive: bool):
        self.distiller.train()
        self.distiller.on_epoch_start(epoch)
        sums = None
        names: list[str] = []
        correct = torch.zeros((), device=self.device)
        seen = 0
        batches = self.train_batches
        bar = tqdm(batches, desc=f"[{self.desc}] epoch {epoch + 1}/{self.epochs}",
                   leave=False, disable=not interactive, file=sys.stderr)
        start = time.perf_counter()
        for x, y, *rows in bar:
            if self.cuda_graphs:  # a new training step: earlier steps' graph outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(self.device, self.amp_dtype):
                logits, losses = self.step_module(x, y, index=rows[0]) if rows else self.step_module(x, y)
                loss = sum(losses.values())
            if len(y) * self.world_size != batches.global_size:
                # Unequal shards (a last partial batch): DDP averages the ranks' gradients
                # with equal weights, so each shard's mean is weighted by its share to give
                # the gradient of the global batch's mean.
                loss = loss * (len(y) * self.world_size / batches.global_size)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.stop_vote.step()
            if self.startup_seconds is None:
                self.startup_seconds = process_age()
            values = torch.stack([v.detach().float() for v in losses.values()]) * len(y)
            if sums is None:
                names, sums = list(losses), values
            else:
                sums += values
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        self.stop_vote.drain()
        # The one sync of the epoch (an all-reduce over the ranks when sharded).
        totals = distributed.all_reduce_sum(torch.cat([sums, correct.view(1), sums.new_full((1,), seen)])).tolist()
        train_seconds = time.perf_counter() - start
        correct_all, seen_all = totals[-2], totals[-1]
        terms = dict(zip(names, (v / seen_all for v in totals[:-2])))
        for name, value in terms.items():
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss term {name!r} became {value} in epoch {epoch + 1}; lower -P lr or check the inputs "
                    f"(the last good checkpoint is {self.workdir / 'last.pt'})"
                )
        return terms, 100.0 * correct_all / seen_all, train_seconds

    def _restore(self, state: dict) -> FitResult:
        missing, unexpected = self.distiller.load_state_dict(state["distiller"], strict=False)
        if unexpected or any(not k.startswith("teachers.") for k in missing):
            raise ConfigError("the checkpoint to resume does not match this mode's networks "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same settings")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.train_batches.generator.set_state(state["batch_rng"])
        # The method's own state (e.g. UDA's unlabelled stream); on_fit_start has run.
        self.distiller.load_checkpoint_extra(state.get("distiller_extra", {}))
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.startup_seconds = -1.0  # not a fresh start: do not report a startup time
        return FitResult(state["best_val_acc"], state["best_epoch"], state["best_student_state"],
                         list(state["history"]))

    def _checkpoint(self, epoch: int, best: FitResult) -> None:
        atomic_save({
            "epoch": epoch,
            "distiller": {k: v.detach().cpu() for k, v in self.distiller.trainable_state_dict().items()},
            "distiller_extra": self.distiller.checkpoint_extra(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_val_acc": best.best_val_acc,
            "best_epoch": best.best_epoch,
            "best_student_state": best.best_student_state,
            "torch_rng": torch.get_rng_state(),
            "batch_rng": self.train_batches.generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": best.history,
            "epochs": self.epochs,
        }, self.workdir / "last.pt")
