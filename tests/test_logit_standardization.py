"""Logit standardization (Sun et al., CVPR 2024): z-scored logits before the temperature,
on every mode whose loss compares logits. References in plain python (statistics, math)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import kd_mlflow.methods.logits as kd_module
from kd_mlflow.config import Config
from kd_mlflow.methods.logits import hinton_kd_loss, standardize_logits
from kd_mlflow.models import create_model
from kd_mlflow.modes import MODES, modes_taking
from kd_mlflow.strategies import _kd_child_cfg
from test_logit_losses import fake_trainer, ref_hinton, synthetic_bundle

LOGIT_MODES = modes_taking("logit_standardization")


def ref_z(rows):
    return [[(v - statistics.mean(r)) / (statistics.stdev(r) + 1e-7) for v in r] for r in rows]


def test_z_score_is_per_sample_with_the_sample_standard_deviation():
    rows = [[1.0, 2.0, 4.0, -3.0], [10.0, 10.5, 9.0, 12.0]]
    got = standardize_logits(torch.tensor(rows, dtype=torch.float64))
    for g, r in zip(got.tolist(), ref_z(rows)):
        assert g == pytest.approx(r, rel=1e-5, abs=1e-6)


def test_kd_on_standardized_logits_matches_the_paper_and_ignores_scale_and_shift():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 7 + 2
    got = hinton_kd_loss(s, t, 2.0, standardize=True).item()
    assert got == pytest.approx(ref_hinton(ref_z(s.tolist()), ref_z(t.tolist()), 2.0), rel=1e-4)
    # the student needs the teacher's relations, not its logit range
    assert hinton_kd_loss(0.1 * s - 5, t, 2.0, standardize=True).item() == pytest.approx(got, rel=1e-4)
    assert hinton_kd_loss(0.1 * s - 5, t, 2.0).item() != pytest.approx(hinton_kd_loss(s, t, 2.0).item(), rel=1e-2)


def _distiller(mode, cfg):
    torch.manual_seed(0)
    student = create_model("resnet8", 10, 1)
    teachers = [create_model("resnet8", 10, 1)] + ([create_model("resnet8", 10, 1)] if mode == "multikd" else [])
    d = MODES[mode].load()(student, teachers, cfg)
    if mode == "uda":
        d.on_fit_start(fake_trainer(synthetic_bundle(8), cfg))
    return d.train()


@pytest.mark.parametrize("mode", [m for m in LOGIT_MODES if MODES[m].kind == "distiller"])
def test_every_logit_distiller_standardizes_when_asked(mode, monkeypatch):
    calls = []

    def spy(logits):
        calls.append(logits.shape)
        return standardize_logits(logits)

    monkeypatch.setattr(kd_module, "standardize_logits", spy)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for flag in (False, True):
        cfg = Config.for_mode(mode, batch_size=4, logit_standardization=flag)
        _, terms = _distiller(mode, cfg)(x, y)
        assert all(torch.isfinite(v) for v in terms.values())
        assert bool(calls) == flag, (mode, flag)


@pytest.mark.parametrize("mode", [m for m in LOGIT_MODES if MODES[m].kind == "strategy"])
def test_strategies_pass_it_to_their_kd_links(mode):
    child = _kd_child_cfg(Config.for_mode(mode, logit_standardization=True), temperature=2.0)
    assert child.mode == "kd" and child.params()["logit_standardization"] is True


def test_the_logit_modes_and_not_the_feature_modes_take_it():
    assert {"kd", "multikd", "kdparam", "takd", "triplet", "uda", "dkd", "dist"} <= set(LOGIT_MODES)
    assert not {"nokd", "oh", "ab", "sfd", "pkd", "rkd", "crd", "teacher"} & set(LOGIT_MODES)
    assert all(MODES[m].param("logit_standardization").default is False for m in LOGIT_MODES)
