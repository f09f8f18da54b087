"""From a validated Config to a finished, logged, registered run.

``run(cfg)`` checks everything that can be checked (mode, device, teacher file and
its shape, output directory, dataset sizes) before it creates an MLflow run, then
trains through ``train_student`` — which multi-stage strategies call once per stage
inside nested runs.

Under torchrun every rank runs all of this in step (the same checks, the same stages);
rank 0 alone owns the MLflow run, the checkpoints and the files, and tells the other
ranks the run id (see kd_mlflow/distributed/).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .checkpoint import atomic_copy, save_model_checkpoint
from .config import Config, ConfigError, unwritable_reason
from .data import DataBundle, DeviceBatches, class_names, load_data
from .models import create_model
from .modes import MODES
from .teachers import PRETRAINED_DIR, finetune_heads, load_teacher, pretrained, teacher_source
from .teachers import cache as teacher_cache
from .teachers.pretrained import is_inside_pretrained
from .tracking import MODEL_CARD, NullTracker, cleanup
from .tracking.serving import model_card
from .trainer import (Trainer, count_correct, cpu_kind, evaluate, exported_test_batches, intra_op_threads,
                      resolve_device, resolve_precision, resolve_threads, seed_everything)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: object  # torch.dtype or None


@dataclass
class TrainResult:
    run_id: str | None
    test_acc: float
    best_val_acc: float
    best_epoch: int
    registered_model: str | None
    version: int | None
    checkpoint: Path
    history: list
    model_uri: str | None = None
    model: object = None  # the selected student, on CPU
    test_acc_last: float | None = None  # the last epoch's student, fp32 like test_acc
    test_correct: int | None = None  # test_acc as a count of test_images
    test_images: int | None = None
    card: dict | None = None  # serving.model_card: how the registry describes this student


def runtime_for(cfg: Config) -> Runtime:
    device = resolve_device(cfg.device)
    return Runtime(device, resolve_precision(cfg.precision, device))


def teacher_output_path(cfg: Config) -> Path:
    return Path(cfg.output) if cfg.output else PRETRAINED_DIR / f"{cfg.dataset}-{cfg.arch}.pt"


def _check_writable(path: Path) -> None:
    reason = unwritable_reason(path.parent, f"-{path.name}")
    if reason:
        raise ConfigError(f"cannot write the output {path}: {reason}; pass -P output=PATH in a writable directory")


def example_input(data: DataBundle, n: int = 2) -> torch.Tensor:
    batches = DeviceBatches(data.test, data.info, n, device="cpu", shuffle=False, augment=False,
                            channels_last=False)
    return batches.normalize(data.test.x[:n])


def raw_example(data: DataBundle, n: int = 2):
    """The first test images as the dataset stores them (uint8; N x H x W for one channel):
    the served model's input example."""
    x = data.test.x[:n].numpy()
    return x[:, 0] if x.shape[1] == 1 else x


def _same_weights(state: dict, other: dict) -> bool:
    """Whether two state dicts hold the same tensors, value for value (as fp32 on CPU)."""
    def as_compared(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)

    return state.keys() == other.keys() and all(torch.equal(as_compared(state[k]), as_compared(other[k]))
                                                for k in state)


def train_student(cfg: Config, distiller_cls, data: DataBundle, teachers: list, tracker, rt: Runtime,
                  *, teacher_meta: dict | None = None, desc: str = "", register: bool = True,
                  resume_state: dict | None = None, teacher_name: str | None = None) -> TrainResult:
    """One training: build the student, fit, measure test_acc once on the selected
    (best validation) student, and log figures, config, checkpoint and model."""
    seed_everything(cfg.seed)
    register = register and cfg.registers  # a smoke run's student stays a logged model unless named
    info = data.info
    student = create_model(cfg.network, info.num_classes, info.in_channels)
    distiller = distiller_cls(student, teachers, cfg)
    data = distiller_cls.adapt_data(data, cfg)
    if distributed.is_main():
        tracker.log_datasets(data.datasets())
    workdir = cleanup.RUNS_DIR / (tracker.run_id or "untracked")
    trainer = Trainer(distiller, data, cfg, device=rt.device, amp_dtype=rt.amp_dtype, tracker=tracker,
                      workdir=workdir, progress_desc=desc or cfg.mode)
    stream = teacher_cache.attach(trainer, resumed=resume_state is not None)
    fit = trainer.fit(resume_state)
    final = stream.metrics() if stream is not None else {}  # teacher forwards computed and reused
    if rt.amp_dtype is not None:
        # The autocast student's score, kept under its own name: it is not the number of
        # the fp32 model that is exported and registered.
        test_batches = DeviceBatches(data.test, info, 512, device=rt.device, shuffle=False, augment=False,
                                     rank=distributed.rank(), world_size=distributed.world_size())
        final["test_acc_bf16"], _ = evaluate(student, test_batches, rt.amp_dtype)
    student_cpu = student.to("cpu").float().to(memory_format=torch.contiguous_format).eval()
    # test_acc is measured on the model exactly as it is exported: fp32, eval mode,
    # contiguous layout, on CPU, so a user who loads the registered model gets the same
    # count of correct images (every rank computes it whole: no collective needed).
    cpu_test = exported_test_batches(data)
    correct, n = count_correct(student_cpu, cpu_test)
    if _same_weights(fit.last_student_state, student_cpu.state_dict()):
        correct_last = correct  # the best epoch was the last: the same model, the same count
    else:
        last = create_model(cfg.network, info.num_classes, info.in_channels)
        last.load_state_dict(fit.last_student_state)
        correct_last, _ = count_correct(last.float().eval(), cpu_test)
    test_acc = 100.0 * correct / n
    final.update({"test_acc": test_acc, "test_correct": correct, "test_images": n,
                  "test_acc_last": 100.0 * correct_last / n, "test_correct_last": correct_last})
    checkpoint = workdir / "model.pt"
    model_uri, version, card = None, None, None
    if distributed.is_main():  # the other ranks have computed the same numbers; rank 0 records them
        final.update({"best_val_acc": fit.best_val_acc, "best_epoch": fit.best_epoch})
        if teacher_meta and "test_acc" in teacher_meta:
            final["teacher_test_acc"] = float(teacher_meta["test_acc"])
        # At the selected epoch's step: the logged model (attached at that step) shows
        # them beside that epoch's val_acc, train_acc and lr.
        tracker.log_metrics(final, step=fit.best_epoch)
        from .analysis.plots import learning_curves  # seaborn pulls in scipy (~2 s): after training, not before

        # the teachers this training really had (the run's teacher tag when the runner
        # knows it): none for nokd, whatever -P teacher says
        teacher_name = teacher_name or (teacher_meta or {}).get("arch") or (
            cfg.teacher if len(teachers) == 1 else f"ensemble of {len(teachers)}" if teachers else "none")
        tracker.log_figure(learning_curves(
            fit.history, f"{cfg.mode}: {cfg.network} on {cfg.dataset}", best_epoch=fit.best_epoch,
            teacher=teacher_name, teacher_acc=(teacher_meta or {}).get("test_acc"), test_acc=test_acc),
            "figures/learning_curves.png")
        tracker.log_dict(cfg.params(), "config.json")
        meta = {"arch": cfg.network, "dataset": cfg.dataset, "num_classes": info.num_classes,
                "in_channels": info.in_channels, "test_acc": test_acc, "test_correct": correct, "test_images": n,
                "best_val_acc": fit.best_val_acc,
                "mode": cfg.mode, "seed": cfg.seed, "epochs": cfg.epochs, "mlflow_run_id": tracker.run_id or ""}
        checkpoint = save_model_checkpoint(checkpoint, student_cpu, meta)
        card = model_card(cfg, info, class_names(cfg.dataset, cfg.resolved_data_dir()), test_correct=correct,
                          test_images=n, best_epoch=fit.best_epoch, run_id=tracker.run_id, teacher_meta=teacher_meta,
                          teacher_name=teacher_name)
        tracker.log_dict(card, MODEL_CARD)  # a strategy that adopts this run later registers it with it
        model_uri, version = tracker.log_model(student_cpu, example_input(data),
                                               registered_name=cfg.model_name if register else None,
                                               checkpoint=checkpoint, card=card, raw_example=raw_example(data),
                                               name=f"{cfg.mode}-{cfg.network}")
    return TrainResult(tracker.run_id, test_acc, fit.best_val_acc, fit.best_epoch,
                       cfg.model_name if version is not None else None, version, checkpoint, fit.history,
                       model_uri, student_cpu, final["test_acc_last"], correct, n, card)


@contextlib.contextmanager
def _terminate_on_sigterm():
    """-> a list that holds the signal number once SIGTERM has arrived. SIGTERM raises
    Terminated; in a process group, the first SIGTERM or Ctrl-C is recorded and every
    rank stops at the same training step (distributed.StopVote), a second one raises."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        if not distributed.request_stop(signum):
            raise distributed.stop_exception(signum)

    signals = (signal.SIGTERM, signal.SIGINT) if distributed.world_size() > 1 else (signal.SIGTERM,)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield received
    finally:
        for sig, handler_ in previous.items():
            signal.signal(sig, handler_)


class _RankTracker(NullTracker):
    """What ranks other than 0 report to: nothing, under rank 0's run id (so that they
    agree on runs/<run_id>/)."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id


@contextlib.contextmanager
def _open_run(start, *args, **kwargs):
    """``start(...)``'s run on rank 0 (the only rank that talks to MLflow); the other
    ranks get a _RankTracker with the run id rank 0 sends them."""
    if distributed.world_size() == 1:
        with start(*args, **kwargs) as tracker:
            yield tracker
        return
    with contextlib.ExitStack() as stack:
        opened = []

        def open_on_main():
            opened.append(stack.enter_context(start(*args, **kwargs)))
            return opened[0].run_id

        run_id = distributed.on_main(open_on_main)
        yield opened[0] if opened else _RankTracker(run_id)


def load_teachers(cfg: Config, mode) -> tuple[list, list]:
    """The frozen teachers the mode's distiller needs -> (models, metadata dicts)."""
    if mode.teacher_source == "teacher":
        sources = [teacher_source(cfg)]
    elif mode.teacher_source == "ensemble":
        sources = [teacher_source(cfg, spec) for spec in cfg.list_of("ensemble")]
    else:
        return [], []
    loaded = [load_teacher(src, cfg) for src in sources]
    return [m for m, _ in loaded], [meta for _, meta in loaded]


def run(cfg: Config, tracker_factory=None):
    """Validate, prepare, then train ``cfg.mode`` in a (possibly adopted) MLflow run."""
    from .tracking import start_run

    cfg.validate()
    from .tracking import check_tracking_server

    if tracker_factory is None:
        check_tracking_server()  # an unreachable server or bad credentials: one line, within seconds
    mode = MODES[cfg.mode]
    impl = mode.load()
    rt = runtime_for(cfg)
    with distributed.session(rt.device, cfg.batch_size, cfg.nproc_per_node) as device:
        if distributed.world_size() > 1:
            rt = Runtime(device, rt.amp_dtype)
            # Log what really runs (torchrun started directly leaves the parameter at 1).
            cfg = cfg.replace(nproc_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size())))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
        with intra_op_threads(resolve_threads(cfg.threads, local)):
            return _run_prepared(cfg, mode, impl, rt, tracker_factory or start_run)


def provenance(rt: Runtime) -> dict:
    """Tags that say what a run's numbers depend on besides its params and seed: the code,
    torch, the device, the CPU's kernels, the precision and the threads it really ran with
    (every run has them, a strategy's stages and a teacher's head fine-tuning too)."""
    from .tracking import code_version

    return {"device": str(rt.device), "precision": "bf16" if rt.amp_dtype is not None else "fp32",
            "world_size": str(distributed.world_size()), "code_version": code_version(),
            "torch_version": torch.__version__, "cpu_kind": cpu_kind(), "threads": str(torch.get_num_threads())}


def run_tags(cfg: Config, rt: Runtime, teacher: str) -> dict:
    """The tags of a run that trains ``cfg`` (a top-level run or a strategy's stage): what
    it is, and how it ran (provenance)."""
    return {"mode": cfg.mode, "dataset": cfg.dataset, "student": cfg.network, "teacher": teacher, **provenance(rt),
            # what optimizer=auto and lr=0 resolved to for this network (params say what was asked)
            "optimizer": cfg.optimizer_used, "lr": f"{cfg.lr_used:g}"}


def _run_prepared(cfg: Config, mode, impl, rt: Runtime, start):
    main = distributed.is_main()
    teachers, metas = load_teachers(cfg, mode)
    teacher_tag = "+".join(m["arch"] for m in metas) or "none"
    if main and mode.teacher_source == "teacher" and cfg.teacher_checkpoint and teacher_tag != cfg.teacher:
        print(f"note: the teacher checkpoint is a {teacher_tag}; -P teacher={cfg.teacher} is ignored",
              file=sys.stderr)
    if mode.teacher_tag is not None:
        teacher_tag = mode.teacher_tag(cfg)
    output = teacher_output_path(cfg) if mode.kind == "teacher" else None
    if output is not None:
        _check_writable(output)
    if hasattr(impl, "prepare"):  # strategies check their own inputs before any run exists
        impl.prepare(cfg)
    resume_run, resume_state = None, None
    if cfg.resume:
        from .tracking import resumable_run

        # The number of processes is how a run runs, not what it computes: a run resumes on any.
        params = {k: v for k, v in cfg.params().items() if k != "nproc_per_node"}
        resume_run = distributed.on_main(
            lambda: resumable_run(params, cfg.resume, lambda rid: (cleanup.RUNS_DIR / rid / "last.pt").is_file()))
        # Read by rank 0 (which wrote it) and sent to the others: no shared disk needed across nodes.
        resume_state = distributed.on_main(
            lambda: torch.load(cleanup.RUNS_DIR / resume_run / "last.pt", map_location="cpu", weights_only=True))
        if main:
            print(f"resuming run {resume_run} after epoch {resume_state['epoch'] + 1}/{resume_state['epochs']}",
                  file=sys.stderr)
    data = load_data(cfg)

    tags = run_tags(cfg, rt, teacher_tag)
    extra = {"run_id": resume_run} if resume_run else {}
    with _terminate_on_sigterm() as sigterm, \
            _open_run(start, cfg.params(), tags, run_name=f"{cfg.mode}-{cfg.network}", **extra) as tracker:
        if cfg.system_metrics:
            tracker.monitor_system()  # rank 0's run only: the other ranks hold a _RankTracker
        try:
            # A teacher whose checkpoint had another class count: its new head first.
            teachers, metas = finetune_heads(cfg, teachers, metas, data, tracker, rt, provenance(rt))
            if mode.kind == "strategy":
                result = impl(cfg, data, teachers, metas, tracker, rt)
            else:
                result = train_student(cfg, impl, data, teachers, tracker, rt,
                                       teacher_meta=metas[0] if len(metas) == 1 else None,
                                       resume_state=resume_state, teacher_name=teacher_tag)
        except Exception as exc:
            if sigterm and distributed.world_size() > 1:
                # A signal a rank got outside the training steps (or a second one, which
                # raises at once): a rank that exits first breaks the collective another
                # one waits in, so that error is really the termination.
                raise distributed.stop_exception(sigterm[0]) from exc
            raise
        if output is not None and main:
            atomic_copy(result.checkpoint, output)
            tracker.set_tags({"checkpoint_path": str(output)})
            print(f"teacher checkpoint written to {output}")
            if is_inside_pretrained(output):
                prog = Path(sys.argv[0]).name
                prog = "kd-mlflow" if prog == "__main__.py" else prog  # python -m kd_mlflow (torchrun)
                argv = [prog, *sys.argv[1:]]  # "kd-mlflow ..." / "run.py ...", not a local path
                entry = pretrained.record(output, " ".join(shlex.quote(a) for a in argv))
                print(f"recorded in {pretrained.MANIFEST} (sha256 {entry['sha256'][:12]}...)")
    cleanup.release_workdir(result.run_id)  # the run is closed, FINISHED
    return result
