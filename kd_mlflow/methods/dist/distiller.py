"""DIST, knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

Instead of matching the teacher's class probabilities exactly (KL), the student matches
their *relations*, measured by Pearson correlation, which is invariant to a shift and a
scale of either side:

* inter-class: for each sample, the correlation of the student's and the teacher's
  probability vectors over the classes; ``1 - mean over samples``;
* intra-class: for each class, the correlation of the student's and the teacher's
  probabilities of that class over the batch; ``1 - mean over classes``.

Loss: ``CE + T^2 * (dist_beta * inter + dist_gamma * intra)``, probabilities at temperature T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Distiller
from ..logits import compared_logits

PEARSON_EPS = 1e-8


def row_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D] x [N, D] -> [N]: Pearson correlation of each row of a with the same row of b
    (centred cosine; the epsilon keeps a constant row finite, at correlation 0)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)


def dist_relations(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter-class, intra-class) relation losses, unweighted and without T^2, in fp32."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter = 1 - row_pearson(p_s, p_t).mean()
    intra = 1 - row_pearson(p_s.t(), p_t.t()).mean()
    return inter, intra


class DIST(Distiller):
    """{"ce": CE, "dist_inter": beta T^2 inter, "dist_intra": gamma T^2 intra}; the
    relations on z-scored logits when cfg.logit_standardization."""

    def forward(self, x, y):
        t_logits = self.teacher_logits(x)
        logits = self.student(x)
        cfg = self.cfg
        s, t = compared_logits(logits, t_logits, cfg.logit_standardization)
        inter, intra = dist_relations(s, t, cfg.temperature)
        scale = cfg.temperature ** 2
        return logits, {
            "ce": F.cross_entropy(logits.float(), y),
            "dist_inter": scale * cfg.dist_beta * inter,
            "dist_intra": scale * cfg.dist_gamma * intra,
        }
