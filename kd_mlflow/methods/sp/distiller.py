"""Similarity-preserving KD (Tung & Mori, ICCV 2019).

For a batch of b images, Q is each network's last-stage activation map reshaped to
[b, C*H*W]; G = Q Q^T is the b x b matrix of pairwise similarities, each row divided by its
L2 norm. The loss is (1/b^2) ||G_T - G_S||_F^2 (the paper's eq. 4 for one layer pair; the
authors' CIFAR recipe and RepDistiller use the last stage only), so the student keeps the
teacher's relations between images whatever the two widths and spatial sizes: no
connector. Activations are what the classifier head sees: ReLU after the network's
``head_norm`` (the final BN of a pre-activation network), as the reference's post-ReLU
features. Computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Distiller


def similarity(activations: torch.Tensor) -> torch.Tensor:
    """The row-normalised b x b Gram matrix of a batch of activations (any trailing shape),
    in fp32: autocast, which would run the product in bf16, is off here."""
    q = activations.float().flatten(1)
    with torch.autocast(q.device.type, enabled=False):
        return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(student_activations: torch.Tensor, teacher_activations: torch.Tensor) -> torch.Tensor:
    """(1/b^2) * ||G_T - G_S||_F^2 of the row-normalised Gram matrices."""
    b = student_activations.shape[0]
    difference = similarity(teacher_activations) - similarity(student_activations)
    return difference.pow(2).sum() / (b * b)


def last_activation(model, stage: torch.Tensor) -> torch.Tensor:
    head_norm = getattr(model, "head_norm", None)
    return F.relu(head_norm(stage) if head_norm is not None else stage)


class SimilarityPreserving(Distiller):
    """{"ce": CE, "sp": sp_weight * sp_loss(last-stage activations of student, teacher)}."""

    def forward(self, x, y):
        with torch.no_grad():
            t = self.teacher.features(x)
            t_act = last_activation(self.teacher, t.stages[-1])
        s = self.student.features(x)
        s_act = last_activation(self.student, s.stages[-1])
        return s.logits, {"ce": F.cross_entropy(s.logits.float(), y),
                          "sp": self.cfg.sp_weight * sp_loss(s_act, t_act)}
