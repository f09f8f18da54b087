"""Hinton KD plus a triplet loss that ties each student output to its own teacher output
and pushes it away from the nearest teacher output of another class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Distiller
from ..logits import hinton_terms


@torch.no_grad()
def hardest_negatives(anchors: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor):
    """For each anchor i, the index k of the candidate closest to it (euclidean) among
    those with ``labels[k] != labels[i]``, and whether such a k exists.

    Selection only: it runs without autograd, so the chosen index is a constant and the
    loss gradient flows through the anchor and the gathered embedding alone.
    -> (index (B,) int64, has_negative (B,) bool); index is 0 where there is no negative.
    """
    dist = torch.cdist(anchors.float(), candidates.float())
    other_class = labels[:, None] != labels[None, :]
    dist = dist.masked_fill(~other_class, float("inf"))
    return dist.argmin(dim=1), other_class.any(dim=1)


def triplet_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       margin: float) -> torch.Tensor:
    """mean over anchors with a negative of max(0, d(a, p) - d(a, n) + margin), where
    a = normalize(s_i), p = normalize(t_i), n = normalize(t_k) with k the hardest in-batch
    sample of another class (closest to a), d the euclidean distance on L2-normalised
    logits. A batch in which no sample has another class gives 0 (still on the graph).
    """
    anchor = F.normalize(student_logits.float(), dim=1)
    teacher = F.normalize(teacher_logits.float(), dim=1)
    neg_idx, has_neg = hardest_negatives(anchor, teacher, labels)
    d_pos = torch.linalg.vector_norm(anchor - teacher, dim=1)
    d_neg = torch.linalg.vector_norm(anchor - teacher[neg_idx], dim=1)
    per_anchor = F.relu(d_pos - d_neg + margin) * has_neg
    return per_anchor.sum() / has_neg.sum().clamp(min=1)


class TripletKD(Distiller):
    """(1 - alpha) * CE + alpha * T^2 * KL(p_t^T || p_s^T) + triplet_weight * triplet."""

    def forward(self, x, y):
        t_logits = self.teacher_logits(x)
        logits = self.student(x)
        cfg = self.cfg
        return logits, {
            **hinton_terms(logits, t_logits, y, cfg),
            "triplet": cfg.triplet_weight * triplet_logit_loss(logits, t_logits, y, cfg.triplet_margin),
        }
