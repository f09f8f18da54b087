"""crd: contrastive representation distillation (Tian et al. 2020) against memory banks, with KD."""

from __future__ import annotations

from ..spec import DATA, OPTIM, PAIR, RUNTIME, TEMPERATURE, Mode, Param, above, at_least


METHOD = Mode(
    "crd", "CRD: CE plus KD plus contrastive representation distillation against a memory bank.", "distiller",
    (*DATA, *PAIR, TEMPERATURE,
     Param("crd_weight", "float", 0.8, "crd: weight of the contrastive (NCE) term.", at_least(0)),
     Param("crd_kd_weight", "float", 1.0, "crd: weight of the KD term (CE has weight 1; 0 = CRD alone).",
           at_least(0)),
     Param("crd_negatives", "int", 16384, "crd: negatives per anchor, images of other classes (capped at what the "
                                         "training split has, with a warning).", at_least(1)),
     Param("crd_temperature", "float", 0.07, "crd: temperature of the contrastive scores.", above(0)),
     Param("crd_dim", "int", 128, "crd: dimension of the projected, L2-normalised embeddings.", at_least(1)),
     Param("crd_momentum", "float", 0.5, "crd: momentum of the memory-bank update.",
           lambda name, v, cfg: None if 0 <= v < 1 else f"{name} must be in [0, 1), got {v}"),
     *OPTIM, *RUNTIME),
    "kd_mlflow.methods.crd.distiller:CRD", terms=("ce", "kd", "crd"))
