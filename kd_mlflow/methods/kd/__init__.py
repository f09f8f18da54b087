"""kd: Hinton et al. (2015), the student matches one frozen teacher's softened outputs."""

from __future__ import annotations

from ..spec import LABELED_FRACTION, LS, Mode, kd_parameters


METHOD = Mode(
    "kd", "Hinton et al. knowledge distillation from one frozen teacher.", "distiller",
    kd_parameters(LABELED_FRACTION, LS), "kd_mlflow.methods.kd.distiller:HintonKD", terms=("ce", "kd"))
