"""oh: the overhaul of feature distillation (Heo et al. 2019)."""

from __future__ import annotations

from ..spec import Mode, Param, at_least, feature_parameters


METHOD = Mode(
    "oh", "Overhaul of feature distillation: pre-ReLU features, teacher-BN margins, partial L2.", "distiller",
    feature_parameters(Param("oh_weight", "float", 1e-3, "oh: weight of the feature term (the paper's 1e-3).",
                             at_least(0))),
    "kd_mlflow.methods.oh.distiller:Overhaul", renamed=(("beta", "oh_weight"),),
    terms=("ce", "oh"))
