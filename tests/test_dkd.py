"""DKD against the paper's equations, computed here with plain python loops in float64
(math.exp / math.log), never with the package's code."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kd_mlflow.config import Config
from kd_mlflow.methods.dkd.distiller import DecoupledKD, dkd_parts, dkd_terms
from kd_mlflow.models import create_model
from test_logit_losses import ref_kl as kl, ref_softmax as softmax


def paper_tckd_nckd(s_row, t_row, target, t):
    """Eq. (1)-(2) of Zhao et al.: b = [p_target, 1 - p_target]; p_hat = the softmax over
    the non-target classes (p_i / (1 - p_target))."""
    ps, pt = softmax(s_row, t), softmax(t_row, t)
    b_s, b_t = [ps[target], 1 - ps[target]], [pt[target], 1 - pt[target]]
    hat_s = [p / (1 - ps[target]) for i, p in enumerate(ps) if i != target]
    hat_t = [p / (1 - pt[target]) for i, p in enumerate(pt) if i != target]
    return kl(b_t, b_s), kl(hat_t, hat_s), kl(pt, ps), pt[target]


def random_case(seed, b=6, c=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


@pytest.mark.parametrize("seed,temperature", [(0, 1.0), (1, 4.0), (2, 0.5)])
def test_parts_match_the_paper_and_kl_decomposes(seed, temperature):
    s, t, y = random_case(seed)
    tckd, nckd = dkd_parts(s, t, y, temperature)
    for i in range(len(y)):
        ref_t, ref_n, ref_kl, p_target = paper_tckd_nckd(s[i].tolist(), t[i].tolist(), int(y[i]), temperature)
        assert tckd[i].item() == pytest.approx(ref_t, rel=1e-4, abs=1e-5)  # the package computes in fp32
        assert nckd[i].item() == pytest.approx(ref_n, rel=1e-4, abs=1e-5)  # the package computes in fp32
        # KL = TCKD + (1 - p_t) NCKD, per sample, at temperature T
        assert ref_kl == pytest.approx(tckd[i].item() + (1 - p_target) * nckd[i].item(), rel=1e-4, abs=1e-5)  # the package computes in fp32


def test_terms_are_weighted_batch_means_times_t_squared_and_warmup():
    s, t, y = random_case(3, b=4, c=3)
    cfg = Config.for_mode("dkd", temperature=2.0, dkd_alpha=0.5, dkd_beta=3.0)
    terms = dkd_terms(s, t, y, cfg, warmup_factor=0.25)
    parts = [paper_tckd_nckd(s[i].tolist(), t[i].tolist(), int(y[i]), 2.0) for i in range(4)]
    ce = sum(-math.log(softmax(s[i].tolist(), 1.0)[int(y[i])]) for i in range(4)) / 4
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["tckd"].item() == pytest.approx(0.25 * 4.0 * 0.5 * sum(p[0] for p in parts) / 4, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(0.25 * 4.0 * 3.0 * sum(p[1] for p in parts) / 4, rel=1e-5)


def test_confident_teacher_keeps_nckd_where_kd_suppresses_it():
    # teacher almost sure of class 0: (1 - p_t) ~ 0 kills NCKD inside KD, not in DKD
    s = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[20.0, 1.0, 0.0]], dtype=torch.float64)
    tckd, nckd = dkd_parts(s, t, torch.tensor([0]), 1.0)
    assert nckd.item() > 0.1 and torch.isfinite(tckd).all()


def _distiller(**values):
    torch.manual_seed(0)
    return DecoupledKD(create_model("resnet8", 10, 1), [create_model("resnet8", 10, 1)],
                       Config.for_mode("dkd", **values))


def test_warmup_is_linear_and_scaled_to_a_short_run_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = _distiller(epochs=40, dkd_warmup=20)
    factors = []
    for epoch in (0, 9, 19, 30):
        d.on_epoch_start(epoch)
        factors.append(d.warmup_factor)
    assert factors == [1 / 20, 10 / 20, 1.0, 1.0]
    with pytest.warns(UserWarning, match="dkd_warmup=20 is longer than the run"):
        short = _distiller(epochs=4, dkd_warmup=20)
    short.on_epoch_start(3)
    assert short.warmup_factor == 1.0
    short.on_epoch_start(1)
    assert short.warmup_factor == 0.5
    none = _distiller(epochs=4, dkd_warmup=0)
    none.on_epoch_start(0)
    assert none.warmup_factor == 1.0


def test_forward_backward_real_networks_and_standardization():
    d = _distiller(epochs=2, dkd_warmup=1).train()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    logits, terms = d(x, y)
    assert set(terms) == {"ce", "tckd", "nckd"} and logits.shape == (4, 10)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in d.student.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())

    s, t, y = random_case(4, b=5, c=4)
    cfg = Config.for_mode("dkd", logit_standardization=True)

    def z(rows):  # the paper's z-score: mean 0, sample standard deviation 1
        out = []
        for r in rows.tolist():
            m = sum(r) / len(r)
            sd = math.sqrt(sum((v - m) ** 2 for v in r) / (len(r) - 1))
            out.append([(v - m) / (sd + 1e-7) for v in r])
        return torch.tensor(out, dtype=torch.float64)

    standardized = dkd_terms(s, t, y, cfg)
    plain = dkd_terms(z(s), z(t), y, cfg.replace(logit_standardization=False))
    assert standardized["tckd"].item() == pytest.approx(plain["tckd"].item(), rel=1e-5)
    assert standardized["nckd"].item() == pytest.approx(plain["nckd"].item(), rel=1e-5)
    assert standardized["ce"].item() == pytest.approx(dkd_terms(s, t, y, cfg.replace(
        logit_standardization=False))["ce"].item())  # CE stays on the raw logits
