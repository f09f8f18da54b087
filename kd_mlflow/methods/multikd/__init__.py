"""multikd: KD from the mean of the KL terms to each member of a teacher ensemble."""

from __future__ import annotations

from ..spec import DATA, HINTON, LS, OPTIM, RUNTIME, Mode, Param


METHOD = Mode(
    "multikd", "KD from the averaged KL to each member of a teacher ensemble.", "distiller",
    (*DATA, "student",
     Param("ensemble", "str", "", "multikd: comma-separated >= 2 teacher checkpoints or models:/ URIs.",
           lambda name, v, cfg: None if len(cfg.list_of(name)) >= 2 else
           f"multikd needs an ensemble of >= 2 teachers, got {len(cfg.list_of(name))}; "
           f"pass -P ensemble=ckpt1.pt,ckpt2.pt (files or models:/ URIs)"),
     *HINTON, LS, *OPTIM, *RUNTIME),
    "kd_mlflow.methods.multikd.distiller:MultiTeacherKD", teacher_source="ensemble",
    needs=("ensemble", "it needs an ensemble of >= 2 teachers; pass -P ensemble=ckpt1.pt,ckpt2.pt "
                       "(files or models:/ URIs) to include it"),
    terms=("ce", "kd"))
