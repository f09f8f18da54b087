"""Feature-based distillers (ab, oh, rkd, pkd, sfd): every loss against values worked out
by hand or by plain loops written here, then every distiller on every kind of
student/teacher pair (depth, width and resolution mismatches) and both input shapes."""

from __future__ import annotations

import functools
import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from kd_mlflow.config import Config
from kd_mlflow.methods.ab import initialisation_epochs
from kd_mlflow.methods.ab.distiller import ActivationBoundaries, ab_loss
from kd_mlflow.methods.features import match_spatial, paired_stages, teacher_pre_relu
from kd_mlflow.methods.oh.distiller import Overhaul, overhaul_margin, partial_l2
from kd_mlflow.methods.pkd.distiller import PatientKD, pkd_stage_loss
from kd_mlflow.methods.rkd.distiller import RelationalKD, rkd_losses
from kd_mlflow.methods.sfd.distiller import SimpleFeatureKD, sfd_stage_loss
from kd_mlflow.models import create_model
from kd_mlflow.modes import MODES

CLASSES = {"ab": ActivationBoundaries, "oh": Overhaul, "rkd": RelationalKD, "pkd": PatientKD,
           "sfd": SimpleFeatureKD}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: OpenMP threads only spin against each other (and against whatever
    # else shares the CPU); one thread is 10x faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def close(a, b, rel=1e-5, abs=1e-6):
    a, b = (v.detach() if isinstance(v, torch.Tensor) else v for v in (a, b))
    return float(a) == pytest.approx(float(b), rel=rel, abs=abs)


# ------------------------------------------------------------------ plain references
def ref_ab(s, tt, m):
    """Sum of the per-element AB loss by loops, divided by B and by C*H*W."""
    B = len(s)
    per_sample = s[0].numel()
    total = 0.0
    for sv, tv in zip(s.flatten().tolist(), tt.flatten().tolist()):
        if sv > -m and tv <= 0:
            total += (m + sv) ** 2
        if sv <= m and tv > 0:
            total += (m - sv) ** 2
    return total / B / per_sample


def ref_partial_l2(s, tt):
    total = 0.0
    for sv, tv in zip(s.flatten().tolist(), tt.flatten().tolist()):
        if not (sv <= tv and tv <= 0):
            total += (sv - tv) ** 2
    return total


def ref_margin(gamma, beta):
    """m - s phi(a) / Phi(-a), a = m/s: with math.erfc where that is exact in float64,
    with 30-digit mpmath in the far tail."""
    s, m = abs(gamma), beta
    a = m / s
    if a < 30:
        phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
        return m - s * phi / (0.5 * math.erfc(a / math.sqrt(2)))
    mpmath.mp.dps = 30
    s, m = mpmath.mpf(s), mpmath.mpf(m)
    return float(m - s * mpmath.npdf(m / s) / mpmath.ncdf(-m / s))


def huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def ref_rkd_distance(es, et):
    n = len(es)

    def norm_dists(e):
        d = {(i, j): math.dist(e[i], e[j]) for i in range(n) for j in range(n) if i != j}
        pos = [v for v in d.values() if v > 0]
        mean = sum(pos) / len(pos)
        return {k: v / mean for k, v in d.items()}

    ds, dt = norm_dists(es.tolist()), norm_dists(et.tolist())
    return sum(huber(ds[k] - dt[k]) for k in ds) / len(ds)


def ref_rkd_angle(es, et):
    n = len(es)

    def cos_at(e, i, j, k):
        u = [a - b for a, b in zip(e[i], e[j])]
        v = [a - b for a, b in zip(e[k], e[j])]
        nu, nv = math.hypot(*u), math.hypot(*v)
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)

    s, tt = es.tolist(), et.tolist()
    terms = [huber(cos_at(s, i, j, k) - cos_at(tt, i, j, k))
             for i in range(n) for j in range(n) for k in range(n) if i != j and k != j]
    return sum(terms) / len(terms)


def ref_pkd(vs, vt):
    total = 0.0
    for a, b in zip(vs.tolist(), vt.tolist()):
        na, nb = math.hypot(*a), math.hypot(*b)
        total += sum((x / na - y / nb) ** 2 for x, y in zip(a, b)) / len(a)  # MSE: mean over features
    return total / len(vs)


def ref_sfd(vs, vt):
    return sum(math.dist(a, b) / math.hypot(*b) for a, b in zip(vs.tolist(), vt.tolist())) / len(vs)


def ref_kd(s_logits, t_logits, y, T, a):
    ce = F.cross_entropy(s_logits, y)
    p_t = F.softmax(t_logits / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s_logits / T, 1))).sum(1).mean() * T * T
    return (1 - a) * ce, a * kl


# ------------------------------------------------------------------ AB
def test_ab_loss_hand_worked():
    # sample 0: teacher off/off/on/on; s=-2 below -m, s=-.5 in the off band (.25),
    # s=.5 in the on band (.25), s=2 above m; sample 1: s=0 everywhere -> 1 per element.
    # Boundaries: s=-1 with t<=0 and s=1... with t>0 (s <= m) count (m-s)^2 = 0.
    s = t([[[[-2.0]], [[-0.5]], [[0.5]], [[2.0]]], [[[0.0]], [[0.0]], [[0.0]], [[0.0]]]])
    tt = t([[[[-1.0]], [[-1.0]], [[1.0]], [[1.0]]], [[[-1.0]], [[1.0]], [[0.0]], [[1.0]]]])
    assert close(ab_loss(s, tt, 1.0), (0.5 + 4.0) / 2 / 4)
    edge = t([[[[-1.0]], [[1.0]]]])
    assert close(ab_loss(edge, t([[[[-3.0]], [[3.0]]]]), 1.0), 0.0)


def test_ab_loss_matches_loops():
    g = torch.Generator().manual_seed(1)
    s, tt = torch.randn(2, 3, 2, 3, generator=g) * 2, torch.randn(2, 3, 2, 3, generator=g)
    for m in (1.0, 0.5):
        assert close(ab_loss(s, tt, m), ref_ab(s, tt, m))


# ------------------------------------------------------------------ OH
def test_partial_l2_hand_worked():
    # (1,0): counted 1; (-2,-1): both off, s below t -> skipped; (-1,-3): s above t -> 4;
    # (.5,2): teacher on -> 2.25
    assert close(partial_l2(t([1.0, -2.0, -1.0, 0.5]), t([0.0, -1.0, -3.0, 2.0])), 7.25)
    g = torch.Generator().manual_seed(2)
    s, tt = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    assert close(partial_l2(s, tt), ref_partial_l2(s, tt))


def test_overhaul_margin_formula():
    bn = torch.nn.BatchNorm2d(8)
    gammas = [1.0, 2.0, -2.0, 1.0, 1.0, 0.5, 1.0, 0.0]
    betas = [0.0, -3.0, -3.0, 0.5, 4.0, 25.0, 60.0, -1.0]
    bn.weight.data, bn.bias.data = t(gammas), t(betas)
    got = overhaul_margin(bn)
    assert got.shape == (8,) and got.dtype == torch.float32
    # By hand: N(0, 1) -> -phi(0)/Phi(0) = -sqrt(2/pi).
    assert close(got[0], -math.sqrt(2 / math.pi))
    # Closed form with erfc (accurate in the tail): Phi(-a) = erfc(a/sqrt2)/2.
    for k in (1, 2, 3, 4):
        s, m = abs(gammas[k]), betas[k]
        a = m / s
        phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
        assert close(got[k], m - s * phi / (0.5 * math.erfc(a / math.sqrt(2))))
    assert 0.5 * math.erfc(4 / math.sqrt(2)) < 1e-3  # channel 4 is past the reference's threshold
    for k in (5, 6):  # Phi(-50), Phi(-60): far tail, margin just below zero (about -s^2/m)
        assert close(got[k], ref_margin(gammas[k], betas[k]), rel=1e-5)
        assert -1.1 * gammas[k] ** 2 / betas[k] < got[k] < 0
    assert close(got[7], -1.0)  # gamma 0: the channel is constantly beta < 0


def test_overhaul_distiller_margins_from_teacher_bns():
    torch.manual_seed(0)
    student = create_model("resnet8", 10, 1)
    for teacher_name in ("resnet14", "wrn-16-2", "resnet18"):
        teacher = create_model(teacher_name, 10, 1)
        bns = teacher.bn_before_relu()
        for k, bn in enumerate(bns):
            bn.weight.data = torch.linspace(-2.0, 2.0, bn.num_features) + 0.01 * (k + 1)
            bn.bias.data = torch.linspace(-1.5, 3.0, bn.num_features)
        d = Overhaul(student, [teacher], Config.for_mode("oh"))
        margins = d.margins()
        assert len(margins) == 3
        for margin, bn in zip(margins, bns[-3:]):  # the last three teacher stages pair up
            assert margin.shape == (1, bn.num_features, 1, 1)
            want = [ref_margin(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
            assert torch.allclose(margin.flatten(), t(want), rtol=1e-5, atol=1e-6)
        assert any(name.startswith("margin") for name, _ in d.named_buffers())


# ------------------------------------------------------------------ RKD
def rkd_distance_loss(es, et):
    return rkd_losses(es, et)[0]


def rkd_angle_loss(es, et):
    return rkd_losses(es, et)[1]


def test_rkd_distance_hand_worked():
    # 1-D points; student 0,100,101 vs teacher 0,1,101: normalised distances
    # (300/202, 303/202, 3/202) vs (3/202, 303/202, 300/202): two Huber terms in the
    # linear regime, 297/202 - 1/2 each, one zero; mean over the 3 pairs.
    es, et = t([[0.0], [100.0], [101.0]]), t([[0.0], [1.0], [101.0]])
    assert close(rkd_distance_loss(es, et), 2 * (297 / 202 - 0.5) / 3)
    # quadratic regime: 0,1,2 vs 0,1,10 -> diffs .6, 0, -.6 -> 2 * .18 / 3
    assert close(rkd_distance_loss(t([[0.0], [1.0], [2.0]]), t([[0.0], [1.0], [10.0]])), 0.12)
    # scale invariance: a 3-4-5 triangle against itself doubled
    tri = t([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert close(rkd_distance_loss(tri, 2 * tri), 0.0)


def test_rkd_angle_hand_worked():
    # Student: right isosceles triangle (cosines 0 at the right angle, 1/sqrt2 at the
    # two others); teacher: equilateral (cosine 1/2 everywhere). Per vertex j there are
    # 4 (i, k) with i, k != j: 2 with i == k (cos 1 both: 0), 2 with the angle.
    es = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    et = t([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    want = (2 * 0.5 * 0.5 ** 2 + 4 * 0.5 * (1 / math.sqrt(2) - 0.5) ** 2) / 12
    assert close(rkd_angle_loss(es, et), want)


def test_rkd_losses_match_loops():
    g = torch.Generator().manual_seed(3)
    es, et = torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g) * 3  # widths differ
    assert close(rkd_distance_loss(es, et), ref_rkd_distance(es, et))
    assert close(rkd_angle_loss(es, et), ref_rkd_angle(es, et))


def indexed_rkd(es, et):
    """RKD's two terms by explicit lists of the pairs (i != j) and triplets (i != j,
    k != j) they average over, one row each: differentiable, so the gradients of the
    batched form can be checked too."""
    n = len(es)
    pairs = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j])
    triplets = torch.tensor([(i, j, k) for i in range(n) for j in range(n) for k in range(n) if j not in (i, k)])

    def distances(e):
        sq = (e[pairs[:, 0]] - e[pairs[:, 1]]).pow(2).sum(1)
        d = sq.clamp_min(1e-12).sqrt()
        return d / d[sq > 0].mean()

    def cosines(e):
        u, v = e[triplets[:, 0]] - e[triplets[:, 1]], e[triplets[:, 2]] - e[triplets[:, 1]]
        return (u * v).sum(1) / (u.norm(dim=1).clamp_min(1e-12) * v.norm(dim=1).clamp_min(1e-12))

    return (F.smooth_l1_loss(distances(es), distances(et).detach()),
            F.smooth_l1_loss(cosines(es), cosines(et).detach()))


@pytest.mark.parametrize("n, duplicate", [(2, False), (17, False), (24, True)])
def test_rkd_losses_and_gradients_match_an_indexed_form(n, duplicate):
    g = torch.Generator().manual_seed(n)
    es, et = torch.randn(n, 8, generator=g).relu(), torch.randn(n, 12, generator=g).relu() * 2
    if duplicate:  # coincident embeddings: zero difference vectors on both sides
        es[3], et[5] = es[1], et[2]
    es.requires_grad_()
    got, want = rkd_losses(es, et), indexed_rkd(es, et)
    for a, b in zip(got, want):
        assert close(a, b)
        (ga,) = torch.autograd.grad(a, es, retain_graph=True)
        (gb,) = torch.autograd.grad(b, es, retain_graph=True)
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6 * gb.abs().max().item())


def test_rkd_teacher_side_has_no_grad_and_duplicates_stay_finite():
    es = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    et = torch.randn(4, 3, requires_grad=True)
    sum(rkd_losses(es, et)).backward()
    assert torch.isfinite(es.grad).all() and et.grad is None


# ------------------------------------------------------------------ PKD / SFD
def test_pkd_stage_loss_hand_worked():
    # (3,4)/5 - (1,0) = (-.4, .8) -> (.16 + .64)/2 = .4 ; (1,0) - (0,1) -> (1 + 1)/2 = 1 ; mean .7
    assert close(pkd_stage_loss(t([[3.0, 4.0], [1.0, 0.0]]), t([[1.0, 0.0], [0.0, 2.0]])), 0.7)
    g = torch.Generator().manual_seed(4)
    vs, vt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert close(pkd_stage_loss(vs, vt), ref_pkd(vs, vt))


def test_sfd_stage_loss_hand_worked():
    # ||(3,4) - (0,5)|| / ||(0,5)|| = sqrt(10)/5 ; ||(2,2) - (1,1)|| / ||(1,1)|| = 1 ; mean (sqrt(10)/5 + 1)/2
    assert close(sfd_stage_loss(t([[3.0, 4.0], [2.0, 2.0]]), t([[0.0, 5.0], [1.0, 1.0]])), (math.sqrt(10) / 5 + 1) / 2)
    # a zero student vector is exactly one teacher norm away, at any width and magnitude
    for width, scale in ((16, 1.0), (512, 300.0)):
        vt = torch.rand(3, width, generator=torch.Generator().manual_seed(width)) * scale
        assert close(sfd_stage_loss(torch.zeros(3, width), vt), 1.0)
    g = torch.Generator().manual_seed(5)
    vs, vt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert close(sfd_stage_loss(vs, vt), ref_sfd(vs, vt))


# ------------------------------------------------------------------ helpers
def test_stage_pairing_and_spatial_matching():
    r8, r18 = create_model("resnet8", 10, 1), create_model("resnet18", 10, 1)
    assert paired_stages(r8, r18) == [(0, 1), (1, 2), (2, 3)]
    assert paired_stages(r18, r8) == [(1, 0), (2, 1), (3, 2)]
    assert paired_stages(r8, create_model("wrn-16-2", 10, 1)) == [(0, 0), (1, 1), (2, 2)]
    big = torch.arange(16.0).view(1, 1, 4, 4)
    small = torch.zeros(1, 1, 2, 2)
    a, b = match_spatial(big, small)
    assert b is small and a.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 block means
    b2, a2 = match_spatial(small, big)
    assert torch.equal(a2, a) and b2 is small


def test_teacher_pre_relu_applies_only_a_pending_bn():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    wrn = create_model("wrn-16-2", 10, 1).eval()
    res = create_model("resnet14", 10, 1).eval()
    with torch.no_grad():
        for bn in wrn.bn_before_relu():
            bn.running_mean.uniform_(-1, 1)
            bn.bias.uniform_(-1, 1)
        wf, rf = wrn.features(x), res.features(x)
        for i, bn in enumerate(wrn.bn_before_relu()):  # WRN: next stage's bn1 / final bn
            assert torch.allclose(teacher_pre_relu(wrn, i, wf.stages[i]), bn(wf.stages[i]))
        for i in range(3):  # ResNet: the stage output already is bn2(...) + residual
            assert torch.equal(teacher_pre_relu(res, i, rf.stages[i]), rf.stages[i])


def test_registry_points_at_these_classes():
    for mode, cls in CLASSES.items():
        assert MODES[mode].load() is cls


# ------------------------------------------------------------------ distillers: values
def _setup(mode, student_name, teacher_name, shape=(4, 1, 8, 8), **cfg):
    torch.manual_seed(0)
    student = create_model(student_name, 10, shape[1])
    teacher = create_model(teacher_name, 10, shape[1])
    with torch.no_grad():  # a teacher that is not at its initialisation
        for bn in teacher.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.2, 0.2)
    d = CLASSES[mode](student, [teacher], Config.for_mode(mode, **cfg)).train()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    return d, x, y


def _pool_to(a, hw):
    return a if a.shape[-2:] == hw else F.adaptive_avg_pool2d(a, hw)


def _pairs_with_features(d, x, pre_relu=False):
    """(student map, teacher map) per paired stage, computed here, not by the distiller."""
    s = d.student.features(x)
    with torch.no_grad():
        tf = d.teacher.features(x)
    tstages = list(tf.stages)
    if pre_relu and hasattr(d.teacher, "bn"):  # WRN: apply the pending BN by hand
        bns = d.teacher.bn_before_relu()
        tstages = [bns[i](f) for i, f in enumerate(tstages)]
    n = min(len(s.stages), len(tstages))
    out = []
    for fs, ft in zip(s.stages[-n:], tstages[-n:]):
        hw = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
        out.append((_pool_to(fs, hw), _pool_to(ft, hw)))
    return s, tf, out


@pytest.mark.parametrize("teacher_name", ["resnet18", "wrn-16-2"])
def test_ab_distiller_value(teacher_name):
    d, x, y = _setup("ab", "resnet8", teacher_name, shape=(2, 1, 4, 4), ab_margin=0.7)
    _, losses = d(x, y)
    s, _, pairs = _pairs_with_features(d, x, pre_relu=True)
    want = sum(w * ref_ab(conn(fs).detach(), ft, 0.7)
               for w, conn, (fs, ft) in zip([0.25, 0.5, 1.0], d.connectors, pairs))
    assert set(losses) == {"ab"} and close(losses["ab"], want, rel=1e-4)


@pytest.mark.parametrize("teacher_name", ["resnet18", "wrn-16-2"])
def test_oh_distiller_value(teacher_name):
    d, x, y = _setup("oh", "resnet8", teacher_name, oh_weight=0.5)
    logits, losses = d(x, y)
    s, _, pairs = _pairs_with_features(d, x, pre_relu=True)
    bns = d.teacher.bn_before_relu()[-3:]
    want = 0.0
    for w, conn, bn, (fs, ft) in zip([0.25, 0.5, 1.0], d.connectors, bns, pairs):
        margin = t([ref_margin(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]).view(1, -1, 1, 1)
        want += w * ref_partial_l2(conn(fs).detach(), torch.maximum(ft, margin))
    assert set(losses) == {"ce", "oh"}
    assert close(losses["oh"], 0.5 * want / len(x), rel=1e-4)
    assert close(losses["ce"], F.cross_entropy(logits, y))


def test_rkd_distiller_value():
    d, x, y = _setup("rkd", "resnet8", "resnet18", alpha=0.6, temperature=2.0,
                     rkd_distance_weight=3.0, rkd_angle_weight=7.0)
    logits, losses = d(x, y)
    s = d.student.features(x)
    with torch.no_grad():
        tf = d.teacher.features(x)
    ce, kd = ref_kd(logits.detach(), tf.logits, y, 2.0, 0.6)
    assert set(losses) == {"ce", "kd", "rkd_distance", "rkd_angle"}
    assert close(losses["ce"], ce) and close(losses["kd"], kd, rel=1e-4)
    assert close(losses["rkd_distance"], 3.0 * ref_rkd_distance(s.embedding.detach(), tf.embedding), rel=1e-4)
    assert close(losses["rkd_angle"], 7.0 * ref_rkd_angle(s.embedding.detach(), tf.embedding), rel=1e-4)


def test_rkd_default_is_distance_only_and_skips_the_angles():
    """rkd_angle_weight 0 (the default): the paper's RKD-D, no "rkd_angle" term at all,
    and the distance term still the hand-written reference's."""
    d, x, y = _setup("rkd", "resnet8", "resnet14", rkd_distance_weight=3.0)
    assert d.cfg.rkd_angle_weight == 0.0
    logits, losses = d(x, y)
    s = d.student.features(x)
    with torch.no_grad():
        tf = d.teacher.features(x)
    assert set(losses) == {"ce", "kd", "rkd_distance"}
    assert close(losses["rkd_distance"], 3.0 * ref_rkd_distance(s.embedding.detach(), tf.embedding), rel=1e-4)


@pytest.mark.parametrize("teacher_name", ["resnet14", "resnet18"])  # equal widths / widths differ
def test_pkd_distiller_value(teacher_name):
    d, x, y = _setup("pkd", "resnet8", teacher_name, alpha=0.3, pkd_weight=10.0)
    logits, losses = d(x, y)
    s, tf, _ = _pairs_with_features(d, x)
    want = 0.0
    for conn, fs, ft in zip(d.connectors, s.stages[-3:], tf.stages[-3:]):
        vs = fs.mean((2, 3))
        if isinstance(conn, torch.nn.Linear):
            vs = vs @ conn.weight.t() + conn.bias
        want += ref_pkd(vs.detach(), ft.mean((2, 3)))
    assert teacher_name == "resnet14" or all(isinstance(c, torch.nn.Linear) for c in d.connectors)
    ce, kd = ref_kd(logits.detach(), tf.logits, y, 4.0, 0.3)
    assert set(losses) == {"ce", "kd", "pkd"}
    assert close(losses["pkd"], 10.0 * want, rel=1e-4)
    assert close(losses["ce"], ce) and close(losses["kd"], kd, rel=1e-4)


def test_sfd_distiller_value():
    d, x, y = _setup("sfd", "resnet8", "resnet18", sfd_weight=2.0)
    logits, losses = d(x, y)
    s, tf, _ = _pairs_with_features(d, x)
    want = 0.0
    for conn, fs, ft in zip(d.connectors, s.stages[-3:], tf.stages[-3:]):
        vs = fs.amax((2, 3)) @ conn.weight.t() + conn.bias
        want += ref_sfd(vs.detach(), ft.amax((2, 3)))
    assert set(losses) == {"ce", "sfd"}
    assert close(losses["sfd"], 2.0 * want, rel=1e-4)
    assert close(losses["ce"], F.cross_entropy(logits, y))


# ------------------------------------------------------------------ distillers: behaviour
@functools.lru_cache(maxsize=None)
def _teacher(name, in_channels):
    torch.manual_seed(1)
    return create_model(name, 10, in_channels)


@pytest.mark.parametrize("mode", list(CLASSES))
@pytest.mark.parametrize("teacher_name", ["resnet20", "resnet18", "wrn-16-2"])
@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_forward_backward_on_every_kind_of_pair(mode, teacher_name, shape):
    torch.manual_seed(0)
    teacher = _teacher(teacher_name, shape[1])
    student = create_model("resnet8", 10, shape[1])
    d = CLASSES[mode](student, [teacher], Config.for_mode(mode, epochs=10)).train()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    logits, losses = d(x, y)
    assert logits.shape == (shape[0], 10)
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    student_grads = [p.grad for p in d.student.parameters() if p.grad is not None]
    assert student_grads and all(torch.isfinite(g).all() for g in student_grads)
    assert any(g.abs().sum() > 0 for g in student_grads)
    connectors = [p for name, p in d.named_parameters() if name.startswith("connectors.")]
    widths_differ = teacher_name != "resnet20"
    assert (len(connectors) > 0) == (mode in ("ab", "oh", "sfd") or (mode == "pkd" and widths_differ))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in connectors)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in connectors)
    assert not any(id(p) in trainable for p in teacher.parameters())
    assert not any(name.startswith("connectors.") for name, _ in d.student.named_parameters())


def test_ab_phases():
    cfg = Config.for_mode("ab", epochs=10, ab_epochs=2)
    assert initialisation_epochs(cfg) == 2
    torch.manual_seed(0)
    d = ActivationBoundaries(create_model("resnet8", 10, 1), [create_model("resnet14", 10, 1)], cfg).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with torch.no_grad():
        want_logits = d.student(x)
    for epoch, keys in [(0, {"ab"}), (1, {"ab"}), (2, {"ce", "kd"}), (5, {"ce", "kd"}), (1, {"ab"})]:
        d.on_epoch_start(epoch)
        logits, losses = d(x, y)
        assert set(losses) == keys, epoch
        assert torch.allclose(logits, want_logits, atol=1e-5)  # the student's own logits
    d.on_epoch_start(3)
    d.zero_grad()
    _, losses = d(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.connectors.parameters())  # unused in the KD phase
    assert d.student.fc.weight.grad is not None
    default = ActivationBoundaries(create_model("resnet8", 10, 1), [create_model("resnet8", 10, 1)],
                                   Config.for_mode("ab", epochs=20))
    assert set(default(x, y)[1]) == {"ab"}  # before any on_epoch_start: the AB phase


@pytest.mark.parametrize("mode", list(CLASSES))
def test_teacher_bn_statistics_untouched(mode):
    torch.manual_seed(0)
    teacher = create_model("wrn-16-2", 10, 1)
    d = CLASSES[mode](create_model("resnet8", 10, 1), [teacher], Config.for_mode(mode)).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("mode", list(CLASSES))
def test_bf16_autocast_losses_are_fp32(mode):
    torch.manual_seed(0)
    d = CLASSES[mode](create_model("resnet8", 10, 1), [create_model("resnet14", 10, 1)],
                      Config.for_mode(mode)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = d(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
        total = sum(losses.values())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    total.backward()


def test_relation_matrices_are_fp32_under_bf16_autocast():
    """rkd's cosines and sp's Gram matrix are products of embeddings that bf16 autocast
    would run in bf16 (8-bit mantissa: cosines off by ~4e-3). Both say they are fp32: under
    autocast they must be the very tensors computed without it."""
    from kd_mlflow.methods.rkd.distiller import relations
    from kd_mlflow.methods.sp.distiller import similarity

    torch.manual_seed(0)
    e = torch.randn(16, 8)
    a = torch.relu(torch.randn(16, 4, 3, 3))
    plain = (*relations(e), similarity(a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = (*relations(e), similarity(a))
    for name, p, u in zip(("distances", "cosines", "gram"), plain, under):
        assert u.dtype == torch.float32 and torch.equal(p, u), name
