"""The logit terms several methods share: Hinton's KD term and logit standardization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each sample's logits (last axis)
    z-scored, ``(z - mean) / (std + 1e-7)`` with the sample (n - 1) standard deviation,
    in fp32. Applied to teacher and student alike before the temperature, it lets the
    student match the teacher's logit *relations* without matching their range."""
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + STANDARDIZE_EPS)


def compared_logits(student_logits, teacher_logits, standardize: bool):
    """The logits a loss compares, in fp32: z-scored when ``standardize``."""
    if standardize:
        return standardize_logits(student_logits), standardize_logits(teacher_logits)
    return student_logits.float(), teacher_logits.float()


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   standardize: bool = False) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch;
    ``standardize``: s and t z-scored per sample first (:func:`standardize_logits`).

    The T^2 factor keeps the gradient scale of the soft term independent of T
    (Hinton et al., 2015). Computed in fp32 whatever the autocast precision: a KL of
    two near-equal distributions loses everything in bf16.
    """
    t = temperature
    student_logits, teacher_logits = compared_logits(student_logits, teacher_logits, standardize)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def hinton_terms(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, cfg) -> dict:
    """Hinton's two terms, weighted: {"ce": (1 - alpha) CE, "kd": alpha T^2 KL} (the KL on
    standardized logits where the mode takes logit_standardization and it is on)."""
    a = cfg.alpha
    standardize = getattr(cfg, "logit_standardization", False)  # a mode that does not declare it: off
    return {
        "ce": (1 - a) * F.cross_entropy(logits.float(), y),
        "kd": a * hinton_kd_loss(logits, teacher_logits, cfg.temperature, standardize),
    }
