"""Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR 2020).

The student learns a representation from which the teacher's can be told apart from
other images' — a contrastive objective on the pooled penultimate embeddings:

* student and teacher embeddings go through linear heads to ``crd_dim`` dimensions and
  are L2-normalised (the heads train with the student and are never part of its model);
* two memory banks hold a projected embedding of every training image, one the
  student's and one the teacher's, each row refreshed when its image is seen:
  ``row <- normalise(m * row + (1 - m) * v)``, m = ``crd_momentum``;
* with the student's embedding v_s of image i as anchor, the teacher bank's row i is the
  positive and K rows of images of *other classes* the negatives (and symmetrically with
  the teacher's embedding against the student bank). Each pair scores
  ``P = exp(v . u / tau) / Z``; NCE (eq. 18 of the paper) with K negatives and the
  uniform noise distribution 1/N: ``h = P / (P + K/N)`` and
  ``L = -(1/B) sum_i [log h(positive_i) + sum_k log(1 - h(negative_ik))]``.
  Z (the partition function, one per direction) is estimated once, from the first
  batch: the mean of its exp(v . u / tau) times N.

Loss: ``CE + crd_kd_weight * KD + crd_weight * (L_student_anchor + L_teacher_anchor)``.

As the authors' code: negatives are drawn uniformly without replacement among the
training images of classes other than the anchor's; a bank row starts uniform in
[-s, s], s = 1/sqrt(crd_dim/3); the positive is scored against the bank before the
bank takes this step's embeddings.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...config import ConfigError
from ..base import Distiller
from ..logits import hinton_kd_loss

NCE_EPS = 1e-7  # as the authors' ContrastLoss
# The training batches draw from `seed`, uda's unlabelled batches from `seed + 1`.
SEED_OFFSET = 2
# Bank rows travel between ranks as floats (see CRD._gathered): exact up to 2^24.
MAX_IMAGES = 2 ** 24


class Embed(nn.Module):
    """Linear projection then L2 normalisation (in fp32 at least, whatever autocast does)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)


def nce_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE loss (eq. 18) of ``p`` [B, 1 + K], P(pair) = exp(score / tau) / Z with the
    positive in column 0 and K negatives after it, noise 1/``n_data`` per draw:
    -(1/B) sum over rows of log h(pos) + sum of log(1 - h(neg)), h(P) = P / (P + K/N)."""
    noise = (p.shape[1] - 1) / n_data
    pos, neg = p[:, 0], p[:, 1:]
    log_h_pos = torch.log(pos / (pos + noise + NCE_EPS))
    log_1_minus_h_neg = torch.log(noise / (neg + noise + NCE_EPS))
    return -(log_h_pos.sum() + log_1_minus_h_neg.sum()) / p.shape[0]


# Above this many scores (b x N), bank_scores gathers the sampled rows instead.
MAX_DENSE_SCORES = 2 ** 26


def bank_scores(memory: torch.Tensor, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[b, R] dot products of each anchor v[i] with the bank rows rows[i, :].

    The paper's code gathers a [b, R, d] block of bank rows and multiplies it by the
    anchors. With R close to N (here K is all the images of other classes, capped), that
    block is d times larger than the scores and moving it dominates the step (180 ms of a
    ~4.5 ms GEMM at b 128, N 6,400, d 128 on 2 CPU cores). So when the [b, N] score matrix
    is small, all of it is computed as one GEMM and the sampled entries picked from it:
    the same dot products, with the same gradient (the bank is not trained). The GEMM
    keeps a copy of the bank for its backward: the bank is updated in place before it.
    Dense only while N is at most 4 R: the copy is then at most four anchors' gathered rows."""
    b, r = rows.shape
    n = memory.shape[0]
    if b * n <= MAX_DENSE_SCORES and n <= 4 * r:
        return (v @ memory.t().clone()).gather(1, rows)
    return torch.bmm(memory[rows], v.unsqueeze(2)).squeeze(2)


@torch.no_grad()
def momentum_update(bank: torch.Tensor, rows: torch.Tensor, v: torch.Tensor, momentum: float) -> None:
    """In place: bank[rows] <- normalise(momentum * bank[rows] + (1 - momentum) * v)."""
    mixed = bank[rows] * momentum + v.to(bank.dtype) * (1 - momentum)
    bank.index_copy_(0, rows, mixed / mixed.norm(dim=1, keepdim=True))


def negatives_cap(labels: torch.Tensor) -> int:
    """How many negatives every image can have: the training images of other classes than
    the largest one's."""
    return len(labels) - int(torch.bincount(labels).max())


class CRD(Distiller):
    """{"ce": CE, "kd": crd_kd_weight T^2 KL, "crd": crd_weight (L_s + L_t)} (see the module
    docstring). Needs each image's row in the training split (``wants_indices``)."""

    wants_indices = True

    def __init__(self, student, teachers=(), cfg=None):
        super().__init__(student, teachers, cfg)
        self.embed_student = Embed(student.embedding_dim, cfg.crd_dim)
        self.embed_teacher = Embed(self.teacher.embedding_dim, cfg.crd_dim)
        # Set by on_fit_start, once the training split is known:
        self.memory_student = self.memory_teacher = None  # [N, crd_dim] banks on the training device
        self.generator: torch.Generator | None = None  # bank initialisation and negatives
        self.negatives = 0  # K: crd_negatives, capped where the data has fewer
        self.z: list | None = None  # [Z student anchor, Z teacher anchor], from the first batch
        self._labels = self._batches = None

    def on_fit_start(self, trainer) -> None:
        cfg, batches = self.cfg, trainer.train_batches
        labels = batches.y
        n, cap = len(labels), negatives_cap(labels)
        if cap < 1:
            raise ConfigError(f"crd needs training images of at least two classes (its negatives come from other "
                              f"classes); this training split has {n} image(s) of one class: raise -P train_subset")
        if n > MAX_IMAGES:
            raise ConfigError(f"crd's memory bank takes at most {MAX_IMAGES} training images, got {n}; "
                              f"pass -P train_subset={MAX_IMAGES}")
        self.negatives = min(cfg.crd_negatives, cap)
        if cfg.crd_negatives > cap:
            warnings.warn(f"crd_negatives={cfg.crd_negatives} is more than the {cap} training images of other "
                          f"classes an image of the largest class has; using {cap}", stacklevel=2)
        device, dtype = trainer.device, self.embed_student.linear.weight.dtype
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + SEED_OFFSET)
        bound = 1 / math.sqrt(cfg.crd_dim / 3)

        def bank():
            u = torch.rand(n, cfg.crd_dim, generator=self.generator, device=device, dtype=dtype)
            return u * (2 * bound) - bound

        self.memory_student, self.memory_teacher = bank(), bank()
        self.z = None
        self._labels, self._batches = labels, batches

    def checkpoint_extra(self) -> dict:
        if self.memory_student is None:
            return {}
        return {"crd_memory_student": self.memory_student.detach().cpu(),
                "crd_memory_teacher": self.memory_teacher.detach().cpu(),
                "crd_z": self.z, "crd_generator": self.generator.get_state()}

    def load_checkpoint_extra(self, extra: dict) -> None:
        if "crd_memory_student" not in extra:
            return
        self.memory_student.copy_(extra["crd_memory_student"])
        self.memory_teacher.copy_(extra["crd_memory_teacher"])
        self.z = None if extra["crd_z"] is None else list(extra["crd_z"])
        self.generator.set_state(extra["crd_generator"])

    # ------------------------------------------------------------------ one step
    def _shard(self, b: int) -> tuple[int, slice]:
        """(size of the global batch, this rank's rows of it) for a shard of ``b`` images:
        (b, all of them) in one process."""
        world, rank = distributed.world_size(), distributed.rank()
        if world == 1:
            return b, slice(0, b)
        total = self._batches.global_size
        lo = total * rank // world
        return total, slice(lo, lo + b)

    def sample_negatives(self, y: torch.Tensor) -> torch.Tensor:
        """[b, K] bank rows: for each image, K distinct images of other classes, uniformly
        (the K smallest of uniform keys). Drawn for the whole global batch and cut to this
        rank's share, so N ranks draw what one process draws."""
        total, shard = self._shard(len(y))
        keys = torch.rand(total, len(self._labels), generator=self.generator, device=y.device)[shard]
        keys.masked_fill_(self._labels.unsqueeze(0) == y.unsqueeze(1), 2.0)  # never drawn: above every key
        return keys.topk(self.negatives, dim=1, largest=False).indices

    def _gathered(self, index, v_s, v_t):
        """The global batch's (rows, v_s, v_t), in its order, on every rank: every rank's
        banks then take the same update."""
        if distributed.world_size() == 1:
            return index, v_s, v_t
        (total, shard), d = self._shard(len(index)), v_s.shape[1]
        packed = v_s.new_zeros(total, 1 + 2 * d)
        packed[shard] = torch.cat([index.to(v_s.dtype).unsqueeze(1), v_s, v_t], dim=1)
        distributed.all_reduce_sum(packed)
        return packed[:, 0].long(), packed[:, 1:1 + d], packed[:, 1 + d:]

    def _estimate_z(self, e_s: torch.Tensor, e_t: torch.Tensor) -> list:
        """[Z_s, Z_t] = N * the mean of exp(score / tau) over the (global) batch's pairs."""
        sums = torch.stack([e_s.sum(), e_t.sum(), e_s.new_tensor(float(e_s.numel()))])
        total_s, total_t, count = distributed.all_reduce_sum(sums).tolist()
        n = len(self._labels)
        return [total_s / count * n, total_t / count * n]

    def contrast(self, v_s: torch.Tensor, v_t: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """L_s + L_t for normalised embeddings [b, d] of the images at bank rows ``index``;
        then the banks take these embeddings."""
        cfg = self.cfg
        rows = torch.cat([index.unsqueeze(1), self.sample_negatives(y)], dim=1)  # [b, 1 + K], positive first
        e_s = torch.exp(bank_scores(self.memory_teacher, rows, v_s) / cfg.crd_temperature)
        e_t = torch.exp(bank_scores(self.memory_student, rows, v_t) / cfg.crd_temperature)
        if self.z is None:
            with torch.no_grad():
                self.z = self._estimate_z(e_s, e_t)
        n = len(self._labels)
        loss = nce_loss(e_s / self.z[0], n) + nce_loss(e_t / self.z[1], n)
        all_rows, all_s, all_t = self._gathered(index, v_s.detach(), v_t.detach())
        momentum_update(self.memory_student, all_rows, all_s, cfg.crd_momentum)
        momentum_update(self.memory_teacher, all_rows, all_t, cfg.crd_momentum)
        return loss

    def forward(self, x, y, index=None):
        if self.memory_student is None or index is None:
            raise RuntimeError("CRD needs on_fit_start(trainer) and each image's row (forward(x, y, index=...)); "
                               "the Trainer provides both")
        cfg = self.cfg
        t_logits, t_embedding = self.teacher_outputs(x, embedding=True)
        s = self.student.features(x)
        v_s, v_t = self.embed_student(s.embedding), self.embed_teacher(t_embedding)
        # Scores at 1/tau = 14 and their exponentials need fp32: no autocast here.
        with torch.autocast(x.device.type, enabled=False):
            crd = self.contrast(v_s, v_t, y, index)
        return s.logits, {
            "ce": F.cross_entropy(s.logits.float(), y),
            "kd": cfg.crd_kd_weight * hinton_kd_loss(s.logits, t_logits, cfg.temperature),
            "crd": cfg.crd_weight * crd,
        }
