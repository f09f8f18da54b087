"""takd: a teacher-assistant chain (Mirzadeh et al. 2020), one KD training per link."""

from __future__ import annotations

from ..spec import LS, Mode, Param, kd_parameters


def _architectures(name, v, cfg):
    from ...models import ARCHITECTURES, is_known_architecture

    chain = cfg.list_of(name)
    if not chain:
        return "takd needs at least one assistant; e.g. -P assistants=resnet14"
    bad = next((a for a in chain if not is_known_architecture(a)), None)
    return None if bad is None else f"unknown assistant architecture {bad!r}; choose from: {', '.join(ARCHITECTURES)}"


METHOD = Mode(
    "takd", "Teacher-assistant chain: KD teacher -> assistants -> student, one nested run per link.", "strategy",
    kd_parameters(Param("assistants", "str", "resnet14", "takd: comma-separated assistant architectures, teacher "
                                                         "side first.", _architectures), LS),
    "kd_mlflow.strategies:takd", terms=("ce", "kd"))
