"""pkd: patient KD (Sun et al. 2019), KD plus normalised pooled stage-feature losses."""

from __future__ import annotations

from ..spec import Mode, Param, at_least, kd_parameters


METHOD = Mode(
    "pkd", "KD plus patient (normalised pooled stage feature) losses.", "distiller",
    # 10, the low end of the paper's 10-1000: the recorded sweep and a 5-seed check (docs/benchmark/).
    kd_parameters(Param("pkd_weight", "float", 10.0, "pkd: weight of the patient (stage feature) term.",
                        at_least(0))),
    "kd_mlflow.methods.pkd.distiller:PatientKD", renamed=(("beta", "pkd_weight"),),
    terms=("ce", "kd", "pkd"))
