"""CRD against the paper's equations, computed here with plain python (math.exp / math.log
on lists), never with the package's code; its memory bank by hand; exact resume on CPU;
the indices the trainer hands it; its bad inputs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_mlflow.config import Config
from kd_mlflow.data import DATASETS, DataBundle, DeviceBatches, Split
from kd_mlflow.methods.crd.distiller import CRD, nce_loss
from kd_mlflow.models import create_model
from kd_mlflow.tracking import NullTracker
from kd_mlflow.trainer import Trainer, seed_everything
from test_bad_input import assert_clean_error, invoke, workdir  # noqa: F401 (a fixture)
from test_distributed import _spawn, as_rank

INFO = DATASETS["fashion_mnist"]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def paper_nce(scores, z, n_data, tau):
    """Eq. (18) with uniform noise 1/N and K negatives per row: P = exp(s/tau)/Z,
    h = P / (P + K/N); -(1/B) sum_i [log h(pos_i) + sum_k log(1 - h(neg_ik))]."""
    total = 0.0
    for row in scores:
        k = len(row) - 1
        p = [math.exp(s / tau) / z for s in row]
        h = [q / (q + k / n_data) for q in p]
        total += math.log(h[0]) + sum(math.log(1 - q) for q in h[1:])
    return -total / len(scores)


def unit_rows(g, n, d):
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


class FakeBatches:
    def __init__(self, y):
        self.y, self.global_size = y, len(y)


def tiny_crd(n_data=12, dim=3, negatives=5, momentum=0.5, tau=0.5):
    """A CRD in float64 whose banks hold ``n_data`` rows of ``dim`` (on_fit_start with a
    stand-in for the trainer: the labels 0, 1, 2, 0, 1, 2, ...)."""
    cfg = Config.for_mode("crd", crd_dim=dim, crd_negatives=negatives, crd_momentum=momentum, crd_temperature=tau)
    crd = CRD(create_model("resnet8", 3, 1), [create_model("resnet8", 3, 1)], cfg).double()
    labels = torch.arange(n_data) % 3
    crd.on_fit_start(type("T", (), {"train_batches": FakeBatches(labels), "device": torch.device("cpu")})())
    return crd, labels


def test_nce_loss_is_the_papers_equation_on_fixed_probabilities():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(4, 6, generator=g, dtype=torch.float64) * 2 - 1).tolist()  # 4 anchors, 5 negatives
    z, n_data, tau = 37.0, 20, 0.07
    p = torch.tensor([[math.exp(s / tau) / z for s in row] for row in scores], dtype=torch.float64)
    assert nce_loss(p, n_data).item() == pytest.approx(paper_nce(scores, z, n_data, tau), rel=1e-6)


def test_contrast_pairs_each_anchor_with_the_other_bank_and_updates_both_by_hand():
    crd, labels = tiny_crd()
    g = torch.Generator().manual_seed(1)
    crd.memory_student.copy_(unit_rows(g, 12, 3))
    crd.memory_teacher.copy_(unit_rows(g, 12, 3))
    ms, mt = crd.memory_student.tolist(), crd.memory_teacher.tolist()
    index = torch.tensor([4, 0, 9, 7])
    y = labels[index]
    negatives = crd.sample_negatives(y)
    crd.sample_negatives = lambda y_: negatives  # the same draw for the check below
    v_s, v_t = unit_rows(g, 4, 3), unit_rows(g, 4, 3)
    vs, vt = v_s.tolist(), v_t.tolist()
    loss = crd.contrast(v_s, v_t, y, index).item()

    rows = [[int(i)] + negatives[r].tolist() for r, i in enumerate(index)]
    s_scores = [[dot(vs[r], mt[j]) for j in rows[r]] for r in range(4)]  # student anchor, teacher bank
    t_scores = [[dot(vt[r], ms[j]) for j in rows[r]] for r in range(4)]  # teacher anchor, student bank
    # Z from this first batch: N times the mean of exp(score / tau) over its pairs, per direction.
    z_s = 12 * sum(math.exp(s / 0.5) for row in s_scores for s in row) / (4 * 6)
    z_t = 12 * sum(math.exp(s / 0.5) for row in t_scores for s in row) / (4 * 6)
    assert crd.z == pytest.approx([z_s, z_t], rel=1e-12)
    assert loss == pytest.approx(paper_nce(s_scores, z_s, 12, 0.5) + paper_nce(t_scores, z_t, 12, 0.5), rel=1e-6)

    def updated(old, v):
        mixed = [0.5 * a + 0.5 * b for a, b in zip(old, v)]
        norm = math.sqrt(dot(mixed, mixed))
        return [m / norm for m in mixed]

    for bank, old, v in ((crd.memory_student, ms, vs), (crd.memory_teacher, mt, vt)):
        want = [list(row) for row in old]
        for r, i in enumerate(index.tolist()):
            want[i] = updated(old[i], v[r])
        assert [x for row in bank.tolist() for x in row] == pytest.approx([x for row in want for x in row], abs=1e-12)
    crd.contrast(v_s, v_t, y, index)
    assert crd.z == pytest.approx([z_s, z_t], rel=1e-12)  # estimated once


def test_negatives_are_distinct_images_of_other_classes_and_capped_with_a_warning():
    crd, labels = tiny_crd(negatives=5)
    y = torch.tensor([0, 1, 2, 0])
    negatives = crd.sample_negatives(y)
    assert negatives.shape == (4, 5)
    for r in range(4):
        assert len(set(negatives[r].tolist())) == 5
        assert all(labels[j] != y[r] for j in negatives[r].tolist())
    with pytest.warns(UserWarning, match="crd_negatives=100 is more than the 8 training images"):
        crd, _ = tiny_crd(negatives=100)  # 12 images, 4 per class: 8 of other classes
    assert crd.negatives == 8 and sorted(crd.sample_negatives(torch.tensor([1]))[0].tolist()) == [0, 2, 3, 5, 6, 8, 9, 11]


def test_batches_with_indices_are_the_same_batches_plus_aligned_rows():
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (55, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (55,), generator=g))

    def batches(rank=0, world=1, **kw):
        return DeviceBatches(split, INFO, 20, device="cpu", shuffle=True, augment=True, seed=3, rank=rank,
                             world_size=world, **kw)

    plain, indexed = batches(), batches(with_indices=True)
    flat = DeviceBatches(split, INFO, 20, device="cpu", shuffle=True, augment=False, seed=3, with_indices=True)
    shards = [batches(r, 2, with_indices=True) for r in range(2)]
    for epoch in range(2):
        for (x, y), (xi, yi, rows), (xf, _, rows_f), *parts in zip(plain, indexed, flat, *shards):
            assert torch.equal(x, xi) and torch.equal(y, yi)  # the same random stream
            assert torch.equal(y, split.y[rows])
            assert torch.equal(xf, flat.normalize(split.x[rows_f]))  # unaugmented: the rows' very images
            assert torch.equal(torch.cat([p[2] for p in parts]), rows)  # each rank's share of the rows
            assert all(torch.equal(p[1], split.y[p[2]]) for p in parts)


# ------------------------------------------------------------------ exact resume on CPU
CFG = dict(train_subset=0, batch_size=32, epochs=2, lr=0.05, device="cpu", precision="fp32", seed=5,
           crd_negatives=40, crd_dim=16)


def tiny_data():
    g = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n,), generator=g))

    return DataBundle(INFO, split(80), split(40), split(40))  # 3 batches: 32, 32, 16


class StopAfterFirstEpoch(NullTracker):
    def log_metrics(self, metrics, step=None):
        if step == 1:
            raise KeyboardInterrupt


def fit(workdir: Path, tracker=None, resume_state=None):
    cfg = Config.for_mode("crd", **CFG)
    torch.manual_seed(1)
    teacher = create_model("resnet8", 10, 1)
    seed_everything(cfg.seed)
    crd = CRD(create_model("resnet8", 10, 1), [teacher], cfg)
    trainer = Trainer(crd, tiny_data(), cfg, device=torch.device("cpu"), amp_dtype=None,
                      tracker=tracker or NullTracker(), workdir=workdir)
    return crd, trainer.fit(resume_state)


def test_one_epoch_then_resume_ends_exactly_as_two_straight_epochs(tmp_path):
    straight, result = fit(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", StopAfterFirstEpoch())
    state = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and set(state["distiller_extra"]) == {
        "crd_memory_student", "crd_memory_teacher", "crd_z", "crd_generator"}
    resumed, resumed_result = fit(tmp_path / "cut", resume_state=state)

    def numbers(history):
        return [{k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_second", "startup_seconds")}
                for h in history]

    assert numbers(resumed_result.history) == numbers(result.history)
    assert {"loss_ce", "loss_kd", "loss_crd"} <= set(result.history[0])
    for k, v in straight.trainable_state_dict().items():
        assert torch.equal(resumed.trainable_state_dict()[k], v), k
    assert torch.equal(resumed.memory_student, straight.memory_student)
    assert torch.equal(resumed.memory_teacher, straight.memory_teacher)
    assert resumed.z == straight.z
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())
    # The heads are the distiller's: the student (what is logged) is the plain network.
    assert any(k.startswith("embed_student.") for k in straight.trainable_state_dict())
    assert set(straight.student.state_dict()) == set(create_model("resnet8", 10, 1).state_dict())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,needle", [
    (["--crd-weight", "-1"], "crd_weight must be >= 0, got -1.0"),
    (["--crd-kd-weight", "-0.5"], "crd_kd_weight must be >= 0"),
    (["--crd-negatives", "0"], "crd_negatives must be >= 1, got 0"),
    (["--crd-dim", "0"], "crd_dim must be >= 1, got 0"),
    (["--crd-momentum", "1"], "crd_momentum must be in [0, 1), got 1.0"),
    (["--crd-momentum", "-0.1"], "crd_momentum must be in [0, 1)"),
    (["--crd-temperature", "0"], "crd_temperature must be > 0"),
    (["--logit-standardization", "true"], "mode crd has no parameter logit_standardization"),
])
def test_bad_crd_parameters_are_one_line(workdir, args, needle):  # noqa: F811 (the fixture)
    assert_clean_error(invoke(["train", "crd", *args, "--epochs", "1", "--device", "cpu"]), needle)


# ------------------------------------------------------------------ two ranks = one process
def _crd_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a tiny CRD training in float64 through the real Trainer (gloo); saves
    its history, student, heads and banks. 155 images in batches of 100: the last batch
    is split 27 + 28, so the ranks' shares differ in size."""
    as_rank(rank, world, port)
    from kd_mlflow import distributed

    cfg = Config.for_mode("crd", batch_size=100, epochs=2, lr=0.05, device="cpu", precision="fp32", seed=5,
                          crd_negatives=60, crd_dim=8)
    g = torch.Generator().manual_seed(0)
    data = DataBundle(INFO, *(Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                                    torch.randint(0, 10, (n,), generator=g)) for n in (155, 50, 10)))
    with distributed.session(torch.device("cpu"), cfg.batch_size, world) as device:
        torch.manual_seed(1)
        teacher = create_model("resnet8", 10, 1)
        seed_everything(cfg.seed)
        crd = CRD(create_model("resnet8", 10, 1), [teacher], cfg).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 60 negatives are more than the largest class leaves
            result = Trainer(crd, data, cfg, device=device, amp_dtype=None, tracker=NullTracker(),
                             workdir=Path(out_dir) / f"runs-{world}").fit()
        torch.save({"history": [{k: v for k, v in h.items() if "second" not in k} for h in result.history],
                    "state": crd.trainable_state_dict(), "banks": (crd.memory_student, crd.memory_teacher),
                    "z": crd.z}, Path(out_dir) / f"{world}-{rank}.pt")


def test_two_ranks_train_what_one_process_trains_in_float64(tmp_path):
    """Each rank draws the negatives of its share of the global batch, Z comes from the
    global batch and every rank's banks take the whole global batch: the one-process run."""
    results = _spawn((1, 2), tmp_path, target=_crd_rank)
    one = results[1][0]
    for rank in results[2]:  # every rank: the one-process numbers, student, heads and banks
        for mine, ref in zip(rank["history"], one["history"], strict=True):
            assert mine == pytest.approx(ref, rel=1e-6, abs=1e-9)
        assert rank["z"] == pytest.approx(one["z"], rel=1e-9)
        for k, v in one["state"].items():
            assert torch.allclose(rank["state"][k].double(), v.double(), rtol=1e-6, atol=1e-9), k
        for mine, ref in zip(rank["banks"], one["banks"]):
            assert torch.allclose(mine, ref, rtol=1e-6, atol=1e-9)


def test_bank_scores_dense_and_gathered_agree(monkeypatch):
    """The dense path (one [b, N] GEMM, then the sampled entries) and the paper's gather of
    [b, R, d] rows give the same scores and the same anchor gradients.

    The claim is a mathematical identity, so both sides run in float64: the two paths sum
    in different orders, and in float32 the anchor gradients (about 1e5, exp(score / 0.07))
    differ by a few ulps that depend on the CPU's kernels (AVX2, AVX-512, AMX)."""
    from kd_mlflow.methods.crd import distiller as crd

    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(50, 8, generator=g, dtype=torch.float64), dim=1)
    rows = torch.randint(0, 50, (6, 20), generator=g)
    anchors = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=1)
    out = {}
    for limit in (crd.MAX_DENSE_SCORES, 0):  # dense, then gathered
        monkeypatch.setattr(crd, "MAX_DENSE_SCORES", limit)
        v = anchors.clone().requires_grad_()
        scores = crd.bank_scores(memory, rows, v)
        torch.exp(scores / 0.07).sum().backward()
        out[limit] = (scores.detach(), v.grad)
    (dense, g_dense), (gathered, g_gathered) = out.values()
    assert g_dense.abs().max() > 1e3  # the large values the claim is about
    assert torch.allclose(dense, gathered, rtol=1e-12, atol=0)
    assert torch.allclose(g_dense, g_gathered, rtol=1e-12, atol=1e-12 * g_dense.abs().max().item())
    # each score is the dot product it names (a hand check of one entry)
    want = sum(a * b for a, b in zip(memory[rows[2, 3]].tolist(), anchors[2].tolist()))
    assert dense[2, 3].item() == pytest.approx(want, rel=1e-12)
