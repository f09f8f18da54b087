"""Relational Knowledge Distillation (Park et al., CVPR 2019): Hinton KD plus matching
the *structure* of the batch in embedding space — pairwise distances and triplet
angles — which needs no connector because widths never meet."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Distiller
from ..logits import hinton_terms


def relations(e: torch.Tensor, angles: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (distances [N, N], cosines [N, N, N], or None without ``angles``) of the rows
    of ``e``, in fp32.

    distances: euclidean, divided by the mean of the positive off-diagonal ones; squared
    distances are floored at 1e-12 before the square root so coincident embeddings give
    a finite gradient (the diagonal is meaningless: callers leave it out).
    cosines: entry (j, i, k) is the cosine of the angle at e_j between e_i - e_j and
    e_k - e_j, 0 where a difference vector is zero (F.normalize's floor, 1e-12 on the
    norm, taken from the same squared distances).

    Both come from one [N, N, D] tensor of differences, built and differentiated once.
    Autocast is off here: it would run the cosines' bmm in bf16.
    """
    with torch.autocast(e.device.type, enabled=False):
        e = e.float()
        diff = e.unsqueeze(0) - e.unsqueeze(1)  # [j, i] = e_i - e_j
        sq = diff.pow(2).sum(-1)
        d = sq.clamp_min(1e-12).sqrt()
        n = len(e)
        positive = (sq > 0) & ~torch.eye(n, dtype=torch.bool, device=e.device)
        mean = (d * positive).sum() / positive.sum().clamp_min(1)
        distances = d / mean.clamp_min(1e-12)
        if not angles:
            return distances, None
        unit = diff / sq.clamp_min(1e-24).sqrt().unsqueeze(-1)
        return distances, torch.bmm(unit, unit.transpose(1, 2))


def rkd_losses(es: torch.Tensor, et: torch.Tensor,
               angles: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (distance loss, angle loss or None without ``angles``), each a smooth L1 (beta 1)
    between student and teacher relations: the distance one averaged over the N(N-1)
    ordered pairs i != j, the angle one over the N(N-1)^2 triplets with i != j and k != j
    (where the angle at j is defined). RepDistiller and the authors' code average over all N^2 and N^3
    entries instead, i.e. (N-1)/N and ((N-1)/N)^2 times these values.

    Both are sums over all entries divided by those counts, not means over boolean-mask
    selections: the angle entries left out are exactly 0 on both sides (a zero
    difference vector normalises to zero), so they add nothing to the sum or to the
    gradient. Gathering the other 2.06M of a permuted [128, 128, 128] tensor, and
    scattering them back in the backward pass, made the angle term ~7x slower (about
    160 vs 21 ms forward + backward, N=128, D=64, one CPU thread), and a boolean index
    waits for the GPU.
    """
    with torch.no_grad():
        dt, at = relations(et, angles)
    ds, a_s = relations(es, angles)
    n = len(es)
    diagonal = torch.eye(n, dtype=torch.bool, device=ds.device)
    # The diagonal distances (1e-6 / mean) differ between the two sides, so it is masked.
    distance = F.smooth_l1_loss(ds, dt, reduction="none", beta=1.0).masked_fill(diagonal, 0).sum()
    distance = distance / max(n * (n - 1), 1)
    if not angles:
        return distance, None
    angle = F.smooth_l1_loss(a_s, at, reduction="sum", beta=1.0)
    return distance, angle / max(n * (n - 1) ** 2, 1)


class RelationalKD(Distiller):
    """{"ce": (1-a) CE, "kd": a KD, "rkd_distance": w_d * L_d, "rkd_angle": w_a * L_a}
    on the pooled penultimate embeddings. With w_a = 0 (the default: the paper's
    distance-only RKD-D, chosen by the recorded sweep) the [N, N, N] angles are not
    computed and there is no "rkd_angle" term."""

    def forward(self, x, y):
        t_logits, t_embedding = self.teacher_outputs(x, embedding=True)
        s = self.student.features(x)
        with_angles = self.cfg.rkd_angle_weight > 0
        distance, angle = rkd_losses(s.embedding, t_embedding, angles=with_angles)
        terms = {**hinton_terms(s.logits, t_logits, y, self.cfg),
                 "rkd_distance": self.cfg.rkd_distance_weight * distance}
        if with_angles:
            terms["rkd_angle"] = self.cfg.rkd_angle_weight * angle
        return s.logits, terms
