"""Logit-based distillers: multi-teacher KD, triplet KD and UDA.

Every expected loss value is computed here independently of the code under test: either
worked by hand on 2-class examples (numbers in the comments) or by plain python loops
over samples and classes with math.exp / math.log.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kd_mlflow.data.augment import normalize, rand_augment, strong_augment, to_uint8
from kd_mlflow.config import Config, ConfigError
from kd_mlflow.data import DATASETS, DataBundle, DeviceBatches, Split
from kd_mlflow.methods.multikd.distiller import MultiTeacherKD, multi_teacher_kd_loss
from kd_mlflow.methods.triplet.distiller import TripletKD, hardest_negatives, triplet_logit_loss
from kd_mlflow.methods.uda.distiller import UDAKD, uda_consistency_loss
from kd_mlflow.models import create_model

LN3 = math.log(3.0)


# ------------------------------------------------------------------ plain references
def ref_softmax(row, temperature=1.0):
    top = max(row)
    e = [math.exp((v - top) / temperature) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_ce(logits, labels):
    return sum(-math.log(ref_softmax(row)[y]) for row, y in zip(logits, labels)) / len(labels)


def ref_hinton(student, teacher, temperature):
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        total += ref_kl(ref_softmax(t_row, temperature), ref_softmax(s_row, temperature))
    return temperature ** 2 * total / len(student)


def ref_multi_kd(student, teachers, temperature):
    kls = []
    for teacher in teachers:
        per_sample = [ref_kl(ref_softmax(t_row, temperature), ref_softmax(s_row, temperature))
                      for s_row, t_row in zip(student, teacher)]
        kls.append(sum(per_sample) / len(per_sample))
    return temperature ** 2 * sum(kls) / len(kls)


def ref_unit(row):
    n = math.sqrt(sum(v * v for v in row))
    return [v / n for v in row]


def ref_dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def ref_triplet(student, teacher, labels, margin):
    anchors = [ref_unit(r) for r in student]
    embeds = [ref_unit(r) for r in teacher]
    losses = []
    for i, a in enumerate(anchors):
        candidates = [k for k in range(len(labels)) if labels[k] != labels[i]]
        if not candidates:
            continue
        k = min(candidates, key=lambda j: ref_dist(a, embeds[j]))
        losses.append(max(0.0, ref_dist(a, embeds[i]) - ref_dist(a, embeds[k]) + margin))
    return sum(losses) / len(losses) if losses else 0.0


def ref_consistency(clean, strong, temperature, threshold):
    total = 0.0
    for c_row, s_row in zip(clean, strong):
        if max(ref_softmax(c_row)) >= threshold:
            total += ref_kl(ref_softmax(c_row, temperature), ref_softmax(s_row))
    return total / len(clean)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def rand_logits(gen, *shape):
    return (torch.randn(*shape, generator=gen) * 3).tolist()


class Fixed(nn.Module):
    """A 'network' whose output is a fixed linear map of the flattened input."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) @ self.weight


# ------------------------------------------------------------------ multi-teacher KD
def test_multi_teacher_kd_hand_worked():
    # One sample, two classes, T = 2, K = 2. Student logits (0, 0) -> p_s = (1/2, 1/2).
    # Teacher 1 logits (2 ln3, 0) -> at T=2 (ln3, 0) -> p = (3/4, 1/4);
    #   KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812.
    # Teacher 2 logits (0, 0) -> KL = 0.
    # L = T^2 * (0.130812 + 0) / 2 = 4 * 0.065406 = 0.261624.
    student = t([[0.0, 0.0]])
    teachers = [t([[2 * LN3, 0.0]]), t([[0.0, 0.0]])]
    assert multi_teacher_kd_loss(student, teachers, 2.0).item() == pytest.approx(0.261624, abs=1e-5)
    # batchmean: a second sample where every distribution agrees adds KL 0 and halves L.
    student2 = t([[0.0, 0.0], [1.0, 1.0]])
    teachers2 = [t([[2 * LN3, 0.0], [5.0, 5.0]]), t([[0.0, 0.0], [-2.0, -2.0]])]
    assert multi_teacher_kd_loss(student2, teachers2, 2.0).item() == pytest.approx(0.130812, abs=1e-5)
    # stacked (K, B, C) input gives the same as a list
    assert multi_teacher_kd_loss(student2, torch.stack(teachers2), 2.0).item() == pytest.approx(0.130812, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_multi_teacher_kd_matches_loop_reference(temperature):
    gen = torch.Generator().manual_seed(1)
    student = rand_logits(gen, 3, 4)
    teachers = [rand_logits(gen, 3, 4) for _ in range(3)]
    got = multi_teacher_kd_loss(t(student), [t(z) for z in teachers], temperature).item()
    assert got == pytest.approx(ref_multi_kd(student, teachers, temperature), rel=1e-5)


def test_multi_teacher_distiller_terms_and_single_forward_per_teacher():
    cfg = Config.for_mode("multikd", alpha=0.7, temperature=3.0)
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(4, 3, generator=gen) for _ in range(4)]
    student, teachers = Fixed(weights[0]), [Fixed(w) for w in weights[1:]]
    calls = []
    for i, teacher in enumerate(teachers):
        teacher.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    distiller = MultiTeacherKD(student, teachers, cfg)
    x = torch.randn(5, 4, generator=gen)
    y = torch.tensor([0, 2, 1, 1, 0])
    logits, terms = distiller(x, y)
    assert sorted(calls) == [0, 1, 2]  # each teacher exactly once per batch
    assert set(terms) == {"ce", "kd"}
    s = (x @ weights[0]).tolist()
    ts = [(x @ w).tolist() for w in weights[1:]]
    assert terms["ce"].item() == pytest.approx(0.3 * ref_ce(s, y.tolist()), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.7 * ref_multi_kd(s, ts, 3.0), rel=1e-5)
    sum(terms.values()).backward()
    assert student.weight.grad is not None
    assert all(teacher.weight.grad is None for teacher in teachers)


def test_multi_teacher_needs_two_teachers():
    cfg = Config.for_mode("multikd")
    with pytest.raises(ValueError, match=">= 2 teachers"):
        MultiTeacherKD(Fixed(torch.zeros(4, 2)), [Fixed(torch.zeros(4, 2))], cfg)
    with pytest.raises(ValueError):
        MultiTeacherKD(Fixed(torch.zeros(4, 2)), [], cfg)


# ------------------------------------------------------------------ triplet
def polar(deg, r=1.0):
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


def test_triplet_hand_worked_hardest_negative():
    # Two classes, so the normalised logits lie on the unit circle, and the euclidean
    # distance of two unit vectors at angle theta is 2 sin(theta / 2).
    # Teacher directions: t0 = 0 deg (y=0), t1 = 90 deg (y=1), t2 = 45 deg (y=1).
    # Anchor 0 (y=0) at 30 deg: d(a,p) = 2 sin 15 = 0.517638; negatives t1 (2 sin 30 = 1.0)
    #   and t2 (2 sin 7.5 = 0.261052): the hardest is t2, so
    #   loss = 0.517638 - 0.261052 + 0.2 = 0.456586 (t1 would give max(0, -0.282) = 0).
    # Anchor 1 (y=1) at 90 deg: d(a,p) = 0, only negative t0 at 2 sin 45 = 1.414214 -> 0.
    # Anchor 2 (y=1) at 0 deg: d(a,p) = 2 sin 22.5 = 0.765367, negative t0 at distance 0
    #   -> 0.765367 + 0.2 = 0.965367.
    # Mean over the 3 anchors = (0.456586 + 0 + 0.965367) / 3 = 0.473984.
    # Magnitudes differ on purpose (5, 3, 0.7; 2, 0.5, sqrt2): only directions count.
    student = t([polar(30, 5.0), polar(90, 3.0), polar(0, 0.7)])
    teacher = t([polar(0, 2.0), polar(90, 0.5), polar(45, math.sqrt(2))])
    labels = torch.tensor([0, 1, 1])
    idx, has_neg = hardest_negatives(torch.nn.functional.normalize(student, dim=1),
                                     torch.nn.functional.normalize(teacher, dim=1), labels)
    assert idx.tolist() == [2, 0, 0] and has_neg.tolist() == [True, True, True]
    assert triplet_logit_loss(student, teacher, labels, 0.2).item() == pytest.approx(0.473984, abs=1e-5)
    # margin 0: anchor 0 -> 0.256586, anchor 2 -> 0.765367; mean = 0.340651
    assert triplet_logit_loss(student, teacher, labels, 0.0).item() == pytest.approx(0.340651, abs=1e-5)


def test_triplet_without_negatives_is_zero_on_graph():
    student = t([[1.0, 2.0], [0.5, -1.0]]).requires_grad_()
    teacher = t([[2.0, 1.0], [1.0, 1.0]])
    loss = triplet_logit_loss(student, teacher, torch.tensor([1, 1]), 0.2)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_triplet_matches_loop_reference_and_grad_flows_through_anchor_only():
    gen = torch.Generator().manual_seed(3)
    student = rand_logits(gen, 7, 5)
    teacher = rand_logits(gen, 7, 5)
    labels = [0, 1, 1, 2, 0, 2, 3]
    s = t(student).requires_grad_()
    tt = t(teacher).requires_grad_()
    loss = triplet_logit_loss(s, tt, torch.tensor(labels), 0.5)
    assert loss.item() == pytest.approx(ref_triplet(student, teacher, labels, 0.5), rel=1e-5)
    idx, _ = hardest_negatives(s, tt, torch.tensor(labels))
    assert not idx.requires_grad
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_triplet_distiller_terms():
    cfg = Config.for_mode("triplet", alpha=0.6, temperature=2.0, triplet_margin=0.3, triplet_weight=2.5)
    gen = torch.Generator().manual_seed(4)
    ws, wt = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    distiller = TripletKD(Fixed(ws), [Fixed(wt)], cfg)
    x = torch.randn(6, 4, generator=gen)
    y = [0, 1, 2, 0, 1, 1]
    _, terms = distiller(x, torch.tensor(y))
    assert set(terms) == {"ce", "kd", "triplet"}
    s, tl = (x @ ws).tolist(), (x @ wt).tolist()
    assert terms["ce"].item() == pytest.approx(0.4 * ref_ce(s, y), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.6 * ref_hinton(s, tl, 2.0), rel=1e-5)
    assert terms["triplet"].item() == pytest.approx(2.5 * ref_triplet(s, tl, y, 0.3), rel=1e-5)


# ------------------------------------------------------------------ UDA consistency
def test_uda_consistency_hand_worked():
    # Sample 0: clean logits (ln 9, 0) -> p = (0.9, 0.1): max 0.9 >= 0.8, kept.
    #   Sharpened at T = 0.4: p ∝ (9^(1/0.4), 1) = (9^2.5, 1) = (243, 1) -> (243/244, 1/244).
    #   Strong logits (0, 0) -> q = (1/2, 1/2).
    #   KL = 243/244 ln(486/244) + 1/244 ln(2/244) = 0.686217 - 0.019689 = 0.666528.
    # Sample 1: clean logits (ln 3, 0) -> max 0.75 < 0.8, masked out.
    # Divided by the batch size 2 (not the mask count 1): 0.333264.
    clean = t([[math.log(9.0), 0.0], [LN3, 0.0]])
    strong = t([[0.0, 0.0], [4.0, -4.0]])
    kl0 = 243 / 244 * math.log(486 / 244) + 1 / 244 * math.log(2 / 244)
    assert kl0 == pytest.approx(0.666528, abs=1e-6)
    got = uda_consistency_loss(clean, strong, 0.4, 0.8).item()
    assert got == pytest.approx(0.333264, abs=1e-6)
    # a threshold below 0.75 keeps sample 1 too (checked against the loop reference)
    assert uda_consistency_loss(clean, strong, 0.4, 0.7).item() == pytest.approx(
        ref_consistency(clean.tolist(), strong.tolist(), 0.4, 0.7), rel=1e-5)
    # without sharpening (T = 1) sample 0's target is (0.9, 0.1): KL = 0.9 ln1.8 + 0.1 ln0.2 = 0.368064
    assert uda_consistency_loss(clean, strong, 1.0, 0.8).item() == pytest.approx(0.368064 / 2, abs=1e-6)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 1.0])
def test_uda_consistency_matches_loop_reference(threshold):
    gen = torch.Generator().manual_seed(5)
    clean, strong = rand_logits(gen, 6, 4), rand_logits(gen, 6, 4)
    got = uda_consistency_loss(t(clean), t(strong), 0.4, threshold).item()
    assert got == pytest.approx(ref_consistency(clean, strong, 0.4, threshold), rel=1e-5, abs=1e-7)


def test_uda_target_is_detached():
    clean = t([[3.0, 0.0, -1.0], [0.2, 0.1, 0.0]]).requires_grad_()
    strong = t([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).requires_grad_()
    uda_consistency_loss(clean, strong, 0.4, 0.5).backward()
    assert clean.grad is None
    assert strong.grad is not None and strong.grad.abs().sum() > 0


# ------------------------------------------------------------------ UDA data and wiring
def synthetic_bundle(n, channels=1, size=28, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    name = "fashion_mnist" if channels == 1 else "cifar10"

    def split(m):
        return Split(torch.randint(0, 256, (m, channels, size, size), dtype=torch.uint8, generator=gen),
                     torch.randint(0, classes, (m,), generator=gen))

    return DataBundle(DATASETS[name], split(n), split(4), split(4))


def test_uda_adapt_data_sizes_and_determinism():
    data = synthetic_bundle(40)
    cfg = Config.for_mode("uda", labeled_fraction=0.5, seed=3)
    a = UDAKD.adapt_data(data, cfg)
    b = UDAKD.adapt_data(data, cfg)
    assert len(a.train) == 20 and len(a.unlabeled) == 40
    assert a.unlabeled is data.train and a.val is data.val and a.test is data.test
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    # the labelled images are a subset of the training split, with their own labels
    pairs = {(bytes(x.flatten().tolist()), int(y)) for x, y in zip(data.train.x, data.train.y)}
    assert all((bytes(x.flatten().tolist()), int(y)) in pairs for x, y in zip(a.train.x, a.train.y))
    assert len({bytes(x.flatten().tolist()) for x in a.train.x}) == 20
    other = UDAKD.adapt_data(data, cfg.replace(seed=4))
    assert not torch.equal(other.train.y, a.train.y) or not torch.equal(other.train.x, a.train.x)
    full = UDAKD.adapt_data(data, cfg.replace(labeled_fraction=1.0))
    assert full.train is data.train and full.unlabeled is data.train
    assert len(UDAKD.adapt_data(data, cfg.replace(labeled_fraction=0.01)).train) == 2
    assert len(UDAKD.adapt_data(data, cfg.replace(labeled_fraction=0.33)).train) == 13  # round(13.2)


def test_semi_supervised_baselines_train_on_the_same_labels_as_uda():
    from kd_mlflow.methods.base import NoKD
    from kd_mlflow.methods.kd.distiller import HintonKD
    from kd_mlflow.methods.rkd.distiller import RelationalKD

    data = synthetic_bundle(40)
    uda = UDAKD.adapt_data(data, Config.for_mode("uda", labeled_fraction=0.25, seed=7))
    for cls, mode in ((NoKD, "nokd"), (HintonKD, "kd")):
        same = cls.adapt_data(data, Config.for_mode(mode, labeled_fraction=0.25, seed=7))
        assert torch.equal(same.train.x, uda.train.x) and torch.equal(same.train.y, uda.train.y), mode
    # a mode without the parameter refuses it, and a benchmark passes it only to the modes that take it
    with pytest.raises(ConfigError, match="mode rkd has no parameter labeled_fraction"):
        Config.for_mode("rkd", labeled_fraction=0.25, seed=7)
    rkd = Config.for_mode("rkd", **Config.taken_by("rkd", {"labeled_fraction": 0.25, "seed": 7}))
    assert RelationalKD.adapt_data(data, rkd) is data
    assert "labeled_fraction" in Config.for_mode("nokd", labeled_fraction=0.25).params()


def fake_trainer(data, cfg, device="cpu"):
    train_batches = DeviceBatches(data.train, data.info, cfg.batch_size, device=device,
                                  shuffle=True, augment=True, seed=cfg.seed)
    return SimpleNamespace(data=data, cfg=cfg, device=torch.device(device), train_batches=train_batches)


def test_uda_distiller_terms_with_known_views():
    cfg = Config.for_mode("uda", alpha=0.8, temperature=2.0, uda_weight=1.5, uda_temperature=0.5,
                          uda_threshold=0.4, batch_size=4)
    gen = torch.Generator().manual_seed(6)
    ws, wt = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    distiller = UDAKD(Fixed(ws), [Fixed(wt)], cfg)
    x = torch.randn(4, 4, generator=gen)
    x_u = torch.randn(4, 4, generator=gen)
    y = [0, 2, 1, 1]
    distiller._unlabeled = iter([x_u])
    distiller._strong = lambda v: 0.5 * v.flip(1) + 1.0  # a known stand-in for RandAugment
    logits, terms = distiller(x, torch.tensor(y))
    assert set(terms) == {"ce", "kd", "kd_strong", "uda"}

    def lin(v, w):
        return (v @ w).tolist()

    xs, xus = 0.5 * x.flip(1) + 1.0, 0.5 * x_u.flip(1) + 1.0
    assert torch.allclose(logits, x @ ws)
    assert terms["ce"].item() == pytest.approx(0.2 * ref_ce(lin(x, ws), y), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.8 * ref_hinton(lin(x, ws), lin(x, wt), 2.0), rel=1e-5)
    assert terms["kd_strong"].item() == pytest.approx(0.8 * ref_hinton(lin(xs, ws), lin(xs, wt), 2.0), rel=1e-5)
    expected_uda = 1.5 * ref_consistency(lin(x_u, ws), lin(xus, ws), 0.5, 0.4)
    assert expected_uda > 0
    assert terms["uda"].item() == pytest.approx(expected_uda, rel=1e-5)


def test_uda_needs_on_fit_start():
    distiller = UDAKD(Fixed(torch.zeros(4, 2)), [Fixed(torch.zeros(4, 2))], Config.for_mode("uda"))
    with pytest.raises(RuntimeError, match="on_fit_start"):
        distiller(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_uda_unlabelled_batches_cycle_and_are_seeded():
    cfg = Config.for_mode("uda", labeled_fraction=0.5, batch_size=4, seed=2)
    data = UDAKD.adapt_data(synthetic_bundle(10), cfg)

    def draws(n):
        d = UDAKD(Fixed(torch.zeros(784, 10)), [Fixed(torch.zeros(784, 10))], cfg)
        d.on_fit_start(fake_trainer(data, cfg))
        return [next(d._unlabeled) for _ in range(n)]

    a, b = draws(7), draws(7)  # 10 images / 4 -> 3 batches a pass: 7 draws cross two passes
    assert [v.shape[0] for v in a] == [4, 4, 2, 4, 4, 2, 4]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------ real networks
SHAPES = [(1, 28), (3, 32)]


def build(mode, channels, **cfg_values):
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10, in_channels=channels)
    if mode == "multikd":
        teachers = [create_model("resnet8", 10, channels), create_model("resnet14", 10, channels)]
    else:
        teachers = [create_model("resnet14", 10, channels)]
    cls = {"multikd": MultiTeacherKD, "triplet": TripletKD, "uda": UDAKD}[mode]
    cfg = Config.for_mode(mode, batch_size=4, **Config.taken_by(mode, cfg_values))  # uda_threshold: uda's
    return cls(student, teachers, cfg), cfg


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("mode", ["multikd", "triplet", "uda"])
def test_distillers_forward_backward_real_networks(mode, channels, size):
    distiller, cfg = build(mode, channels, uda_threshold=0.0)
    data = synthetic_bundle(12, channels, size)
    if mode == "uda":
        data = UDAKD.adapt_data(data, cfg.replace(labeled_fraction=0.5))
        distiller.on_fit_start(fake_trainer(data, cfg))
    trainer_batches = fake_trainer(data, cfg).train_batches
    x, y = next(iter(trainer_batches))
    distiller.train()
    logits, terms = distiller(x, y)
    assert logits.shape == (4, 10)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    sum(terms.values()).backward()
    student_grads = [p.grad for p in distiller.student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in student_grads)
    assert all(p.grad is None for p in distiller.teachers.parameters())
    assert all(not t.training for t in distiller.teachers)


@pytest.mark.parametrize("mode", ["multikd", "triplet", "uda"])
def test_distillers_under_bf16_autocast_return_fp32_terms(mode):
    distiller, cfg = build(mode, 1)
    data = synthetic_bundle(8)
    if mode == "uda":
        distiller.on_fit_start(fake_trainer(UDAKD.adapt_data(data, cfg), cfg))
    x, y = next(iter(fake_trainer(data, cfg).train_batches))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = distiller(x, y)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# ------------------------------------------------------------------ RandAugment
@pytest.mark.parametrize("channels,size", SHAPES)
def test_rand_augment_keeps_shape_dtype_device_and_changes_images(channels, size):
    images = synthetic_bundle(16, channels, size).train.x
    torch.manual_seed(0)
    out = rand_augment(images)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device
    assert (out != images).any(dim=(1, 2, 3)).float().mean() > 0.5
    torch.manual_seed(0)
    assert torch.equal(rand_augment(images), out)  # reproducible under the global seed


def test_rand_augment_chunks_draw_different_ops():
    # 8 copies of one image, one chunk each: identical inputs, so different outputs
    # can only come from different random ops.
    image = synthetic_bundle(1, 3, 32).train.x
    torch.manual_seed(0)
    out = rand_augment(image.expand(8, -1, -1, -1).contiguous(), chunks=8)
    assert len({bytes(o.flatten().tolist()) for o in out}) >= 4
    torch.manual_seed(0)
    same = rand_augment(image.expand(8, -1, -1, -1).contiguous(), chunks=1)
    assert len({bytes(o.flatten().tolist()) for o in same}) == 1


@pytest.mark.parametrize("channels,size", SHAPES)
def test_strong_augment_of_normalised_images(channels, size):
    data = synthetic_bundle(8, channels, size)
    batches = DeviceBatches(data.train, data.info, 8, device="cpu", shuffle=False, augment=False)
    u = data.train.x
    x = batches.normalize(u)
    assert torch.equal(to_uint8(x, batches.mean, batches.std), u)  # exact round trip
    assert torch.allclose(normalize(u, batches.mean, batches.std), x)
    torch.manual_seed(1)
    out = strong_augment(x, batches.mean, batches.std)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    assert torch.allclose(out, batches.normalize(rand_augment(u)))
    assert not torch.allclose(out, x)
    with pytest.raises(ValueError):
        strong_augment(x)
