"""ab: Activation Boundaries (Heo et al. 2019) on pre-ReLU stage features, then KD."""

from __future__ import annotations

from ..spec import Mode, Param, above, kd_parameters


def initialisation_epochs(cfg) -> int:
    """The epochs of activation-boundary initialisation: ab_epochs, or 10% of the run (>= 1)."""
    return cfg.ab_epochs or max(1, round(0.1 * cfg.epochs))


def _ab_epochs(name, v, cfg):
    if v < 0:
        return f"ab_epochs must be >= 0 (0 = 10% of epochs), got {v}"
    if initialisation_epochs(cfg) >= cfg.epochs:
        return (f"ab needs more epochs ({cfg.epochs}) than its {initialisation_epochs(cfg)} activation-boundary "
                f"epochs so KD can follow; raise -P epochs or lower -P ab_epochs")
    return None


METHOD = Mode(
    "ab", "Activation-boundary transfer on pre-ReLU stage features, then KD.", "distiller",
    kd_parameters(
        Param("ab_epochs", "int", 0, "ab: epochs of activation-boundary initialisation (0 = 10% of epochs, >= 1).",
              _ab_epochs),
        Param("ab_margin", "float", 1.0, "ab: margin of the activation-boundary loss.", above(0))),
    "kd_mlflow.methods.ab.distiller:ActivationBoundaries", terms=("ab", "ce", "kd"))
