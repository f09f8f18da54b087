"""triplet: KD plus a triplet loss on L2-normalised logits (hardest in-batch negative)."""

from __future__ import annotations

from ..spec import LS, Mode, Param, at_least, kd_parameters


METHOD = Mode(
    "triplet", "KD plus a triplet loss on L2-normalised logits (hardest in-batch negative).", "distiller",
    kd_parameters(
        Param("triplet_margin", "float", 0.2, "triplet: margin of the triplet loss on L2-normalised logits.",
              at_least(0)),
        Param("triplet_weight", "float", 1.0, "triplet: weight of the triplet term.", at_least(0)), LS),
    "kd_mlflow.methods.triplet.distiller:TripletKD", terms=("ce", "kd", "triplet"))
