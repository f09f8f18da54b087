"""allkd: one KD student per teacher; the best student by validation accuracy wins."""

from __future__ import annotations

from ..spec import DATA, HINTON, LS, OPTIM, RUNTIME, Mode, Param, at_least


METHOD = Mode(
    "allkd", "One KD student per teacher; the best student by validation accuracy wins.", "strategy",
    (*DATA, "student",
     Param("teachers", "str", "resnet14,resnet20",
           "allkd: comma-separated teachers (architectures, checkpoints or models:/ URIs).",
           lambda name, v, cfg: None if cfg.list_of(name) else
           "teachers is empty; pass -P teachers=resnet14,resnet20 (architectures, checkpoints or models:/ URIs)"),
     Param("teacher_epochs", "int", 0, "allkd: epochs for teachers that must be trained first (0 = epochs).",
           at_least(0, " (0 = epochs)")),
     *HINTON, LS, *OPTIM, *RUNTIME),
    "kd_mlflow.strategies:allkd", teacher_source="", teacher_tag=lambda cfg: ",".join(cfg.list_of("teachers")),
    terms=("ce", "kd"))
