"""dist: DIST (Huang et al. 2022), inter- and intra-class correlation relations of the probabilities."""

from __future__ import annotations

from ..spec import DATA, LS, OPTIM, PAIR, RUNTIME, TEMPERATURE, Mode, Param, at_least


METHOD = Mode(
    "dist", "DIST: CE plus inter- and intra-class Pearson-correlation relations of the probabilities.", "distiller",
    # T 2, not the paper's CIFAR 4: chosen by the recorded sweep (docs/benchmark/).
    (*DATA, *PAIR, TEMPERATURE.but(default=2.0),
     Param("dist_beta", "float", 2.0, "dist: weight of the inter-class relation term.", at_least(0)),
     Param("dist_gamma", "float", 2.0, "dist: weight of the intra-class relation term.", at_least(0)),
     LS, *OPTIM, *RUNTIME),
    "kd_mlflow.methods.dist.distiller:DIST", terms=("ce", "dist_inter", "dist_intra"))
