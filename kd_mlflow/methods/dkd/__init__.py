"""dkd: decoupled KD (Zhao et al. 2022), target- and non-target-class KD weighted apart."""

from __future__ import annotations

from ..spec import DATA, LS, OPTIM, PAIR, RUNTIME, TEMPERATURE, Mode, Param, at_least


METHOD = Mode(
    "dkd", "Decoupled KD: CE plus target-class and non-target-class KD, separately weighted, warmed up.",
    "distiller",
    (*DATA, *PAIR, TEMPERATURE,
     Param("dkd_alpha", "float", 1.0, "dkd: weight of TCKD (target-class KD).", at_least(0)),
     Param("dkd_beta", "float", 8.0, "dkd: weight of NCKD (non-target-class KD).", at_least(0)),
     Param("dkd_warmup", "int", 20, "dkd: epochs of linear warm-up of the DKD terms (scaled to the run when "
                                    "longer; 0 = none).", at_least(0)),
     LS, *OPTIM, *RUNTIME),
    "kd_mlflow.methods.dkd.distiller:DecoupledKD", terms=("ce", "tckd", "nckd"))
