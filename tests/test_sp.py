"""Similarity-preserving KD (Tung & Mori 2019) against values worked out by hand and from
the paper's equations written out element by element in float64 (not the package's code)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_mlflow.config import Config
from kd_mlflow.methods.sp.distiller import SimilarityPreserving, similarity, sp_loss
from kd_mlflow.models import create_model
from kd_mlflow.modes import MODES


def paper_sp_loss(student, teacher) -> float:
    """Eq. 2-4 of the paper for one layer pair: G = Q Q^T, each row / its L2 norm,
    (1/b^2) * sum of squared differences. Plain Python floats."""
    def rows_normalised_gram(q):
        q = [[float(v) for v in row] for row in q.reshape(q.shape[0], -1).tolist()]
        b = len(q)
        g = [[sum(a * c for a, c in zip(q[i], q[j])) for j in range(b)] for i in range(b)]
        return [[g[i][j] / math.sqrt(sum(v * v for v in g[i])) for j in range(b)] for i in range(b)]

    gs, gt = rows_normalised_gram(student), rows_normalised_gram(teacher)
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def test_sp_loss_by_hand():
    # student: two orthogonal images, G = I; teacher: two equal images, each G row (1, 1)/sqrt(2)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # ||G_T - G_S||^2 = 2 ((1/sqrt2 - 1)^2 + 1/2) = 4 - 2 sqrt2; / b^2 = 1 - sqrt2 / 2
    want = 1 - math.sqrt(2) / 2
    assert sp_loss(student.double(), teacher.double()).item() == pytest.approx(want, rel=1e-6)
    assert sp_loss(student, teacher).item() == pytest.approx(want, rel=1e-6)
    # equal similarity structure: zero, whatever the widths and the scale of either network
    assert sp_loss(torch.eye(3), 7.0 * torch.eye(3)).item() == 0.0
    wide = torch.cat([torch.eye(3), torch.zeros(3, 5)], dim=1)
    assert sp_loss(torch.eye(3), wide).item() == 0.0


def test_sp_loss_matches_the_papers_equations_on_feature_maps():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64).relu()
    teacher = torch.randn(6, 8, 2, 2, generator=g, dtype=torch.float64).relu()  # other width and size
    got = sp_loss(student, teacher).item()
    assert got == pytest.approx(paper_sp_loss(student, teacher), rel=1e-6)  # fp32 inside, values ~1e-1
    assert got > 0
    rows = similarity(student).double().norm(dim=1)
    assert torch.allclose(rows, torch.ones(6, dtype=torch.float64), rtol=1e-6)


def test_sp_distiller_terms_and_gradients_on_real_networks():
    torch.manual_seed(0)
    cfg = Config.for_mode("sp", sp_weight=3000.0).validate()
    student, teacher = create_model("resnet8", 10, 1), create_model("resnet20", 10, 1)
    d = SimilarityPreserving(student, [teacher], cfg).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    logits, terms = d(x, y)
    assert set(terms) == {"ce", "sp"} == set(MODES["sp"].terms)
    with torch.no_grad():
        s_act = F.relu(student.features(x).stages[-1])  # a post-activation ResNet: head_norm is the identity
        t_act = F.relu(teacher.features(x).stages[-1])
    assert terms["sp"].item() == pytest.approx(3000.0 * paper_sp_loss(s_act.double(), t_act.double()), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-5)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert Config.for_mode("sp").sp_weight == 3000.0  # the paper's CIFAR gamma
