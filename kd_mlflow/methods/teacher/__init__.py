"""teacher: a network trained with cross-entropy, written as a teacher checkpoint."""

from __future__ import annotations

from ..spec import IMAGES, OPTIM, RUNTIME, Mode, Param


def _output(name, v, cfg):
    if cfg.dataset == "imagefolder" and not v:
        return ("the teacher entry point on dataset=imagefolder needs -P output=FILE: pretrained/ holds the "
                "built-in datasets' teachers, and 'imagefolder' names no particular folder")
    return None


METHOD = Mode(
    "teacher", "Train a network with cross-entropy and write a teacher checkpoint.", "teacher",
    ("dataset",
     Param("arch", "str", "resnet20", "Architecture of the network the teacher entry point trains."),
     Param("output", "str", "", "Where the teacher entry point writes its checkpoint; empty = "
                                "pretrained/<dataset>-<arch>.pt.", _output),
     "data_dir", *IMAGES, "train_subset", "val_size", "test_subset", *OPTIM, *RUNTIME),
    "kd_mlflow.methods.base:NoKD", teacher_source="", network="arch", terms=("ce",))
