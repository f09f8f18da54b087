"""The mode registry, found by discovery: what the CLI, the MLproject, validation, the
runner, the benchmark and the tests read.

A method is a folder ``kd_mlflow/methods/<name>/`` whose ``__init__.py`` declares it
(``METHOD``, a :class:`~kd_mlflow.methods.spec.Mode`), or an entry point of the
``kd_mlflow.methods`` group in another installed package that names such a ``Mode``.
Declarations import no torch, so listing the modes costs milliseconds; a mode's code is
imported when it runs (``Mode.load``).

Order: the baseline first, then the built-in methods by name, then the other packages'
methods by name, the teacher entry point last.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import replace
from importlib.metadata import entry_points

from . import methods
from .errors import ConfigError
from .methods.spec import (  # noqa: F401  (re-exported: the declaration types and groups live in methods.spec)
    COMMON, DATA, EXECUTION, IMAGES, OPTIM, PAIR, RUNTIME, Mode, Param, above, at_least, within,
)

ENTRY_POINT_GROUP = "kd_mlflow.methods"


def _builtin() -> list[Mode]:
    found = []
    for info in pkgutil.iter_modules(methods.__path__):
        if not info.ispkg:
            continue  # shared modules (spec, base, logits, features)
        module = importlib.import_module(f"{methods.__name__}.{info.name}")
        declared = getattr(module, "METHOD", None)
        if not isinstance(declared, Mode) or declared.name != info.name:
            raise ConfigError(f"kd_mlflow/methods/{info.name}/__init__.py must declare METHOD = Mode({info.name!r}, ...)")
        found.append(declared)
    return found


def _installed(taken: set) -> list[Mode]:
    """The Modes other packages register under the entry-point group. One that fails to
    load, is not a Mode, or reuses a taken name is left out with a one-line warning: a
    broken plugin must not stop the package."""
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = ep.dist.name if ep.dist is not None else ep.value
        try:
            declared = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import error of someone else's package
            print(f"warning: method {ep.name!r} from {origin} not loaded: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        problem = (f"{ep.value} is not a kd_mlflow.methods.spec.Mode" if not isinstance(declared, Mode)
                   else f"it is named {declared.name!r}, not {ep.name!r}" if declared.name != ep.name
                   else f"the name {ep.name!r} is taken" if ep.name in taken
                   else f"kind {declared.kind!r} is not distiller" if declared.kind != "distiller" else None)
        if problem:
            print(f"warning: method {ep.name!r} from {origin} left out: {problem}", file=sys.stderr)
            continue
        taken.add(ep.name)
        found.append(replace(declared, origin=origin))
    return found


def _with_resume(mode: Mode) -> Mode:
    # Single trainings can continue from their last epoch checkpoint; strategies cannot (yet).
    if mode.kind == "strategy" or "resume" in mode.fields:
        return mode
    return replace(mode, parameters=(*mode.parameters, "resume"))


def _ordered(builtin: list[Mode], installed: list[Mode]) -> list[Mode]:
    def key(m: Mode):
        return (not m.baseline, m.kind == "teacher", m.name)

    return sorted(builtin, key=key) + sorted(installed, key=lambda m: m.name)


_BUILTIN = _builtin()
MODES: dict[str, Mode] = {m.name: _with_resume(m) for m in
                          _ordered(_BUILTIN, _installed({m.name for m in _BUILTIN}))}
DISTILLATION_MODES = [m for m, spec in MODES.items() if spec.kind != "teacher"]
SINGLE_MODES = [m for m, spec in MODES.items() if spec.kind == "distiller"]
BASELINE = next(m.name for m in MODES.values() if m.baseline)


def declared_parameter(name: str, mode: str | None = None) -> Param | None:
    """The Param ``mode`` declares as ``name``; else the first mode's of that name (a
    parameter read on a mode that lacks it takes that default); None if no mode has it."""
    if mode in MODES and MODES[mode].param(name) is not None:
        return MODES[mode].param(name)
    return next((m.param(name) for m in MODES.values() if m.param(name) is not None), None)


def modes_taking(name: str) -> list[str]:
    return [m.name for m in MODES.values() if name in m.fields]
