"""uda: KD on clean and RandAugment views plus UDA consistency (Xie et al.) on unlabelled data."""

from __future__ import annotations

from ..spec import LABELED_FRACTION, LS, Mode, Param, above, at_least, kd_parameters, within


METHOD = Mode(
    "uda", "KD on clean and RandAugment views plus UDA consistency on unlabelled data.", "distiller",
    kd_parameters(
        Param("uda_weight", "float", 1.0, "uda: weight of the consistency term.", at_least(0)),
        Param("uda_temperature", "float", 0.4, "uda: sharpening temperature of the consistency target.", above(0)),
        Param("uda_threshold", "float", 0.8, "uda: confidence below which unlabelled samples are masked out.",
              within(0, 1)),
        LABELED_FRACTION, LS),
    "kd_mlflow.methods.uda.distiller:UDAKD", terms=("ce", "kd", "kd_strong", "uda"))
