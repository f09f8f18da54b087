"""nokd: the student with cross-entropy only, the baseline every mode is compared with."""

from __future__ import annotations

from ..spec import DATA, LABELED_FRACTION, OPTIM, PAIR, RUNTIME, Mode


METHOD = Mode(
    "nokd", "Student trained with cross-entropy only (the baseline).", "distiller",
    (*DATA, *PAIR, LABELED_FRACTION, *OPTIM, *RUNTIME), "kd_mlflow.methods.base:NoKD", teacher_source="",
    baseline=True, terms=("ce",))
