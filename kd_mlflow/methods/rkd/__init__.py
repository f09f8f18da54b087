"""rkd: relational KD (Park et al. 2019), distance- and angle-wise losses on embeddings, with KD."""

from __future__ import annotations

from ..spec import Mode, Param, at_least, kd_parameters


METHOD = Mode(
    "rkd", "KD plus relational distance- and angle-wise losses on embeddings.", "distiller",
    kd_parameters(
        Param("rkd_distance_weight", "float", 25.0, "rkd: weight of the distance-wise term.", at_least(0)),
        # 0, not the paper's 50: the recorded sweep and a 5-seed check (docs/benchmark/).
        Param("rkd_angle_weight", "float", 0.0, "rkd: weight of the angle-wise term (0: distance only, RKD-D; the "
                                                "paper's RKD-DA uses 50).", at_least(0))),
    "kd_mlflow.methods.rkd.distiller:RelationalKD", terms=("ce", "kd", "rkd_distance"))
