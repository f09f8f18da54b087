"""Teacher outputs computed once per data stream (kd_mlflow/teacher_cache.py), on real
Fashion-MNIST and the committed resnet20 teacher, in process (no MLflow: a recording
tracker stands in). With the cache on, every student's weights and logged numbers must
be bit-identical to computing the teacher every step; a key that differs must not reuse;
a batch that is not the cached one must raise."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kd_mlflow.teachers import cache as teacher_cache
from kd_mlflow.benchmark import BenchmarkResult, plan, train_pairs
from kd_mlflow.checkpoint import save_model_checkpoint
from kd_mlflow.config import Config
from kd_mlflow.data import DeviceBatches, load_data
from kd_mlflow.methods.kd.distiller import HintonKD
from kd_mlflow.methods.logits import hinton_terms
from kd_mlflow.models import create_model
from kd_mlflow.runner import Runtime, run, train_student
from kd_mlflow.teachers import load_teacher, teacher_source
from kd_mlflow.tracking import NullTracker

# 500 images at batch 64: 7 full batches and a partial one of 52 per epoch.
SMALL = dict(dataset="fashion_mnist", student="resnet8", epochs=2, train_subset=500, val_size=200, test_subset=300,
             batch_size=64, device="cpu", precision="fp32", system_metrics=False)
STEPS = 8 * 2  # batches x epochs
# Even smaller, for the runs that check which trainings share: 4 batches, one epoch.
TINY = {**SMALL, "epochs": 1, "train_subset": 256, "val_size": 100, "test_subset": 100}
# Metrics that measure time or the cache itself, not what was learned.
NOT_LEARNED = {"epoch_seconds", "images_per_second", "startup_seconds", "teacher_forwards_computed",
               "teacher_forwards_reused"}


class Recorder(NullTracker):
    """A run as logged: params, metrics (name -> [(step, value)]), the logged model's
    weights, and child runs by name."""

    def __init__(self, run_id: str = "root"):
        self.run_id = run_id
        self.params, self.metrics, self.children, self.state = {}, {}, {}, None

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict, step=None) -> None:
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append((step, value))

    def log_figure(self, fig, path: str) -> None:
        import matplotlib.pyplot as plt

        plt.close(fig)

    def log_model(self, model, *args, **kwargs):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return None, None

    @contextlib.contextmanager
    def child(self, name: str, tags=None):
        self.children[name] = Recorder(f"{self.run_id}-{name}")
        yield self.children[name]

    def last(self, name: str):
        return self.metrics[name][-1][1]


def run_recorded(cfg: Config) -> Recorder:
    """runner.run(cfg) into a Recorder (the parent's, for a strategy)."""
    recorder = Recorder(cfg.mode)

    @contextlib.contextmanager
    def start(params, tags, run_name=None, **_):
        recorder.log_params(params)
        yield recorder

    run(cfg, tracker_factory=start)
    return recorder


def assert_same_training(a: Recorder, b: Recorder) -> None:
    assert a.state.keys() == b.state.keys()
    for key in a.state:
        assert torch.equal(a.state[key], b.state[key]), key
    learned = lambda r: {k: v for k, v in r.metrics.items() if k not in NOT_LEARNED}  # noqa: E731
    assert learned(a) == learned(b)
    assert "test_correct" in a.metrics and "loss_kd" in a.metrics


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/<run id>/ checkpoints land here
    return tmp_path


@pytest.fixture
def second_teacher(tmp_path):
    """A second, different teacher checkpoint (an untrained resnet8) for multikd and mismatches."""
    torch.manual_seed(7)
    return str(save_model_checkpoint(tmp_path / "resnet8-teacher.pt", create_model("resnet8", 10, 1),
                                     {"arch": "resnet8", "dataset": "fashion_mnist", "num_classes": 10,
                                      "in_channels": 1}))


def test_kdparam_grid_is_bit_identical_with_the_cache_and_reuses_the_teacher(in_tmp):
    grids = {}
    for on in (False, True):
        cfg = Config.for_mode("kdparam", temperatures="2,8", alphas="0.5", teacher_cache=on, **SMALL)
        grids[on] = run_recorded(cfg)
    off, on = grids[False], grids[True]
    assert list(on.children) == list(off.children) == ["kd-T2-alpha0.5", "kd-T8-alpha0.5"]
    for name in off.children:
        assert_same_training(off.children[name], on.children[name])
        assert "teacher_forwards_reused" not in off.children[name].metrics
    first, second = on.children.values()
    assert (first.last("teacher_forwards_computed"), first.last("teacher_forwards_reused")) == (STEPS, 0)
    assert (second.last("teacher_forwards_computed"), second.last("teacher_forwards_reused")) == (0, STEPS)
    assert (on.last("teacher_forwards_computed"), on.last("teacher_forwards_reused")) == (STEPS, STEPS)
    assert "teacher_forwards_reused" not in off.metrics
    assert on.last("test_correct") == off.last("test_correct")


def test_benchmark_of_kd_multikd_rkd_crd_is_bit_identical_and_reuses_kds_teacher(in_tmp, second_teacher):
    parents = {}
    for on in (False, True):
        configs, notes = plan("kd,multikd,rkd,crd", 1, {**SMALL, "teacher_cache": on,
                                                 "ensemble": f"pretrained:fashion_mnist-resnet20,{second_teacher}"})
        assert not notes
        parents[on] = Recorder("benchmark")
        result = BenchmarkResult("benchmark", "test")
        counts = train_pairs(configs, parents[on], result, echo=lambda *_: None)
        assert not result.failed and len(result.trained) == 4
        assert (counts is not None) == on
    off, on = parents[False], parents[True]
    assert list(on.children) == ["crd-seed0", "kd-seed0", "multikd-seed0", "rkd-seed0"]  # registry order
    for name in off.children:
        assert_same_training(off.children[name], on.children[name])
        assert on.children[name].last("test_correct") == off.children[name].last("test_correct")
    # crd runs first and needs the pooled embedding too: the teacher runs and its logits and
    # embeddings are kept; kd, on the same stream, reads the logits; multikd's first member
    # is that teacher on the same batches (read), its second one runs; rkd reads both.
    crd, kd, multikd, rkd = (on.children[f"{m}-seed0"] for m in ("crd", "kd", "multikd", "rkd"))
    assert (crd.last("teacher_forwards_computed"), crd.last("teacher_forwards_reused")) == (STEPS, 0)
    assert (kd.last("teacher_forwards_computed"), kd.last("teacher_forwards_reused")) == (0, STEPS)
    assert (multikd.last("teacher_forwards_computed"), multikd.last("teacher_forwards_reused")) == (STEPS, STEPS)
    assert (rkd.last("teacher_forwards_computed"), rkd.last("teacher_forwards_reused")) == (0, STEPS)


def test_another_seed_subset_teacher_or_batch_size_does_not_reuse(in_tmp, second_teacher):
    def reused(**changes) -> int:
        child = run_recorded(Config.for_mode("kd", **{**TINY, **changes}))
        return child.last("teacher_forwards_reused")

    with teacher_cache.session() as counts:
        assert reused() == 0  # fills the cache
        assert reused(seed=1) == 0
        assert reused(train_subset=192) == 0
        assert reused(teacher_checkpoint=second_teacher) == 0
        assert reused(batch_size=32) == 0
        assert reused() == 4  # the first stream again: read
    assert counts.reused == 4 and teacher_cache._active is None


def test_teacher_cache_false_turns_it_off_inside_a_session(in_tmp):
    with teacher_cache.session():
        run_recorded(Config.for_mode("kd", **TINY))
        child = run_recorded(Config.for_mode("kd", teacher_cache=False, **TINY))
    assert "teacher_forwards_reused" not in child.metrics


@pytest.mark.parametrize("check_now, when", [(True, "before using it"), (False, "at its end")])
def test_a_batch_that_differs_from_the_cached_one_raises(in_tmp, monkeypatch, check_now, when):
    """On CPU the step that meets the wrong batch stops; on an accelerator (check_now
    false: no device sync per step) the pass that met it stops at its end."""
    init = teacher_cache.Stream.__init__

    def stream_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.check_now = check_now

    monkeypatch.setattr(teacher_cache.Stream, "__init__", stream_init)
    cfg = Config.for_mode("kd", **TINY)
    with teacher_cache.session():
        run_recorded(cfg)
        # Batches made differently under the same key (as a change the key missed would):
        # the fingerprint tells, and the run stops instead of training on wrong targets.
        normalize = DeviceBatches.normalize
        monkeypatch.setattr(DeviceBatches, "normalize", lambda self, x: normalize(self, x) * 1.001)
        with pytest.raises(teacher_cache.TeacherCacheMismatch, match=f"fingerprint.*{when}"):
            run_recorded(cfg)


def test_a_full_cache_stops_growing_and_stays_exact(in_tmp, capsys):
    cfg = Config.for_mode("kd", **TINY)
    entry = 64 * 10 * 4 + 2 * 8  # one batch's fp32 logits and its fingerprint
    with teacher_cache.session(max_mb=2.5 * entry / 2 ** 20):
        first = run_recorded(cfg)
        assert "the teacher cache is full" in capsys.readouterr().err
        second = run_recorded(cfg)
    assert (second.last("teacher_forwards_computed"), second.last("teacher_forwards_reused")) == (2, 2)
    assert_same_training(first, second)


class EmbeddingKD(HintonKD):
    """Hinton KD that also asks for the teacher's pooled embedding, and keeps what it got."""

    def forward(self, x, y):
        t_logits, t_embedding = self.teacher_outputs(x, embedding=True)
        self.seen.append((t_logits, t_embedding))
        logits = self.student(x)
        return logits, hinton_terms(logits, t_logits, y, self.cfg)


def test_embeddings_are_cached_beside_the_logits(in_tmp):
    cfg = Config.for_mode("kd", **{**TINY, "train_subset": 128}).validate()
    data = load_data(cfg)
    teacher, _ = load_teacher(teacher_source(cfg), cfg)
    rt = Runtime(torch.device("cpu"), None)

    def train(cls):
        EmbeddingKD.seen = []
        tracker = Recorder(cls.__name__)
        train_student(cfg, cls, data, [teacher], tracker, rt)
        return tracker, EmbeddingKD.seen

    with teacher_cache.session():
        logits_only, _ = train(HintonKD)
        computed, seen = train(EmbeddingKD)  # the logits are there, the embeddings are not yet
        reused, seen_again = train(EmbeddingKD)
    assert (computed.last("teacher_forwards_computed"), computed.last("teacher_forwards_reused")) == (2, 0)
    assert (reused.last("teacher_forwards_computed"), reused.last("teacher_forwards_reused")) == (0, 2)
    for (logits, embedding), (logits2, embedding2) in zip(seen, seen_again, strict=True):
        assert torch.equal(logits, logits2) and torch.equal(embedding, embedding2)
        assert embedding.shape == (64, teacher.embedding_dim)
    assert_same_training(computed, reused)
