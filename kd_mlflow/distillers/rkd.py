"""Relational Knowledge Distillation (Park et al., CVPR 2019): Hinton KD plus matching
the *structure* of the batch in embedding space — pairwise distances and triplet
angles — which needs no connector because widths never meet."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller
from .kd import hinton_terms


def _off_diagonal(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """[N, N] euclidean distances divided by the mean of the positive off-diagonal ones.

    Squared distances are floored at 1e-12 before the square root so coincident
    embeddings give a finite gradient; the diagonal is meaningless and left to callers
    to mask.
    """
    e = e.float()
    sq = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1)
    d = sq.clamp_min(1e-12).sqrt()
    positive = _off_diagonal(len(e), e.device) & (sq > 0)
    mean = (d * positive).sum() / positive.sum().clamp_min(1)
    return d / mean.clamp_min(1e-12)


def rkd_distance_loss(es: torch.Tensor, et: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (beta 1) between normalised distance matrices, mean over the N(N-1)
    ordered pairs i != j (the diagonal, 0 = 0 for both, is not counted)."""
    with torch.no_grad():
        dt = normalized_distances(et)
    ds = normalized_distances(es)
    mask = _off_diagonal(len(es), es.device)
    return F.smooth_l1_loss(ds[mask], dt[mask], beta=1.0)


def triplet_cosines(e: torch.Tensor) -> torch.Tensor:
    """[N, N, N]: entry (i, j, k) is the cosine of the angle at e_j between e_i - e_j and
    e_k - e_j (0 where a difference vector is zero)."""
    e = e.float()
    diff = F.normalize(e.unsqueeze(1) - e.unsqueeze(0), p=2, dim=2)  # [j, i] = unit(e_i - e_j)
    cos = torch.bmm(diff, diff.transpose(1, 2))  # [j, i, k]
    return cos.permute(1, 0, 2)


def rkd_angle_loss(es: torch.Tensor, et: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (beta 1) between the triplet-cosine tensors, mean over the N(N-1)^2
    triplets with i != j and k != j (where the angle at j is defined)."""
    with torch.no_grad():
        at = triplet_cosines(et)
    a_s = triplet_cosines(es)
    n = len(es)
    off = _off_diagonal(n, es.device)
    mask = off.unsqueeze(2) & off.t().unsqueeze(0)  # [i, j, k]: i != j and k != j
    return F.smooth_l1_loss(a_s[mask], at[mask], beta=1.0)


class RelationalKD(Distiller):
    """{"ce": (1-a) CE, "kd": a KD, "rkd_distance": w_d * L_d, "rkd_angle": w_a * L_a}
    on the pooled penultimate embeddings."""

    def forward(self, x, y):
        with torch.no_grad():
            t = self.teacher.features(x)
        s = self.student.features(x)
        return s.logits, {
            **hinton_terms(s.logits, t.logits, y, self.cfg),
            "rkd_distance": self.cfg.rkd_distance_weight * rkd_distance_loss(s.embedding, t.embedding),
            "rkd_angle": self.cfg.rkd_angle_weight * rkd_angle_loss(s.embedding, t.embedding),
        }
