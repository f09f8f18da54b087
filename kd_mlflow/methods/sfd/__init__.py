"""sfd: simple feature distillation, L2 between max-pooled stage features relative to the teacher's."""

from __future__ import annotations

from ..spec import Mode, Param, at_least, feature_parameters


METHOD = Mode(
    "sfd", "CE plus L2 between global-max-pooled student (via connector) and teacher stage features.",
    "distiller",
    # 0.3: the recorded sweep over 0.3, 1, 3 (docs/benchmark/).
    feature_parameters(Param("sfd_weight", "float", 0.3, "sfd: weight of the stage feature term.", at_least(0))),
    "kd_mlflow.methods.sfd.distiller:SimpleFeatureKD", renamed=(("beta", "sfd_weight"),),
    terms=("ce", "sfd"))
