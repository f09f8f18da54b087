"""Hinton KD loss against values worked out on paper (two classes, so every softmax
and KL term can be written down)."""

import math

import torch
import torch.nn.functional as F

from kd_mlflow.config import Config
from kd_mlflow.methods.kd.distiller import HintonKD
from kd_mlflow.methods.logits import hinton_kd_loss


def kl_two_class(p: float, q: float) -> float:
    """KL([p, 1-p] || [q, 1-q]) written out."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_t1_teacher_three_to_one_student_uniform():
    # teacher logits [ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> [1/2, 1/2]
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # = 0.130812...
    assert abs(expected - 0.1308120) < 1e-6
    assert hinton_kd_loss(s, t, 1.0).item() == pytest_approx(expected)


def test_temperature_softens_and_t_squared_scales():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    # T = 2: p_t = softmax([ln3 / 2, 0]) = [sqrt3 / (sqrt3 + 1), 1 / (sqrt3 + 1)]
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4.0 * kl_two_class(p, 0.5)  # T^2 = 4
    assert abs(expected - 0.1453631) < 1e-6
    assert hinton_kd_loss(s, t, 2.0).item() == pytest_approx(expected)


def test_batchmean_divides_by_batch_not_by_elements():
    # second sample: student equals teacher -> KL 0; the mean is over 2 samples, not 4 entries
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]])
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    assert hinton_kd_loss(s, t, 1.0).item() == pytest_approx(expected)


def test_shift_invariance_and_zero_when_equal():
    s = torch.tensor([[2.0, -1.0, 0.5]])
    assert hinton_kd_loss(s, s + 7.0, 3.0).item() == pytest_approx(0.0, abs=1e-6)


def test_hinton_kd_weights_ce_and_kd_terms():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits.clone())

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    cfg = Config.for_mode("kd", temperature=1.0, alpha=0.25)
    d = HintonKD(Fixed(torch.tensor([[0.0, 0.0]])), [Fixed(torch.tensor([[math.log(3.0), 0.0]]))], cfg)
    _, losses = d(torch.zeros(1, 1), torch.tensor([0]))
    # CE of a uniform 2-class prediction is ln 2
    assert losses["ce"].item() == pytest_approx(0.75 * math.log(2))
    assert losses["kd"].item() == pytest_approx(0.25 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)))
    # the teacher is frozen: no gradient reaches it
    sum(losses.values()).backward()
    assert d.teacher.logits.grad is None and d.student.logits.grad is not None


def test_bf16_inputs_are_computed_in_fp32():
    s = torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.bfloat16)
    out = hinton_kd_loss(s, t, 1.0)
    assert out.dtype == torch.float32
    ref = F.kl_div(F.log_softmax(s.float(), 1), F.softmax(t.float(), 1), reduction="batchmean")
    assert out.item() == pytest_approx(ref.item())


def pytest_approx(v, abs=1e-6):
    import pytest

    return pytest.approx(v, abs=abs)
