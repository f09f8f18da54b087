"""What a logged student carries so that it explains itself and serves real images.

``model_card`` (no MLflow) gathers, for one trained student: the MLmodel metadata
(dataset, class names, input layout and range, normalisation), the registered
version's description and tags, and the step (the selected epoch) the logged model is
attached to. ``save_model`` is the "flavor" handed to ``mlflow.models.Model.log``: the
PyTorch flavor (``mlflow.pytorch.load_model`` returns the network, as before) whose
python_function flavor is replaced by ``pyfunc_images`` (raw uint8 images in, class
names out), with that signature and a raw input example.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

LOADER = "kd_mlflow_images"  # the module name of pyfunc_images.py inside a model's code/


def model_card(cfg, info, class_names: list, *, test_correct: int, test_images: int, best_epoch: int,
               run_id: str | None, teacher_meta: dict | None = None, teacher_name: str = "none") -> dict:
    """JSON-able facts about one student, for its logged model and registered version."""
    test_acc = 100.0 * test_correct / test_images
    layout = "N x H x W" if info.in_channels == 1 else "N x C x H x W"
    metadata = {"kd_mlflow": {
        "dataset": cfg.dataset, "class_names": list(class_names), "mode": cfg.mode, "student": cfg.network,
        "input": {"dtype": "uint8", "range": [0, 255], "layout": layout, "channels": info.in_channels,
                  "height": info.image_size, "width": info.image_size},
        "normalization": {"mean": list(info.mean), "std": list(info.std),
                          "formula": "(x / 255 - mean) / std, per channel"},
        # image folders: images of any size are resized as the test images were (shorter
        # side to short_side, centre crop to height x width) before normalisation
        **({"resize": {"short_side": max(info.image_size, round(info.image_size / 0.875)),
                       "crop": info.image_size}} if info.resized_crop else {}),
        "network_input": "float32 N x C x H x W, normalised as above (mlflow.pytorch.load_model)",
        "selected_epoch": best_epoch + 1,
    }}
    teacher = "" if teacher_name == "none" else teacher_name
    if teacher and teacher_meta and "test_acc" in teacher_meta:
        teacher += f" (test_acc {float(teacher_meta['test_acc']):.2f}%)"
    description = "\n".join([
        f"{cfg.network} student on {cfg.dataset}, trained by kd-mlflow mode `{cfg.mode}`"
        + (f" from teacher {teacher}." if teacher else " (no teacher)."),
        f"test_acc {test_acc:.2f}% ({test_correct}/{test_images} test images), the fp32 model as registered; "
        f"selected at epoch {best_epoch + 1} of {cfg.epochs} by validation accuracy.",
        f"Run: {run_id or '(untracked)'}.",
        "",
        "Load it:",
        "- `mlflow.pyfunc.load_model(\"{model_uri}\").predict(images)`: raw uint8 images "
        f"({layout}, 0-255, as {cfg.dataset} stores them) -> DataFrame label, class_index, probability.",
        "- `mlflow.pytorch.load_model(\"{model_uri}\")`: the network; input float32 N x C x H x W as "
        f"(x/255 - {list(info.mean)}) / {list(info.std)}; output logits. It is an exported graph, "
        "already in inference mode: call it, do not call .eval().",
    ])
    tags = {"mode": cfg.mode, "dataset": cfg.dataset, "student": cfg.network,
            "teacher": teacher_name, "test_acc": f"{test_acc:.2f}"}
    if info.class_names:  # an image folder's classes are its own: the version says which
        tags["class_names"] = ",".join(info.class_names)[:5000]
    return {"metadata": metadata, "description": description, "tags": tags, "step": int(best_epoch)}


def raw_signature(card: dict):
    """The output schema (label, class_index, probability) and no input schema: MLflow
    enforces an input schema before the model sees a request, which admits one layout
    only (a TensorSpec has one rank) and no DataFrame of images, and answers a mismatch
    with a dump of the request. pyfunc_images accepts every layout and format of
    MLmodel's ``kd_mlflow.input`` and refuses the rest in one line."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(outputs=Schema([ColSpec("string", "label"), ColSpec("long", "class_index"),
                                          ColSpec("double", "probability")]))


def save_model(path, mlflow_model, *, pytorch_model, example, raw_example, raw_signature, **kwargs):
    """mlflow.pytorch's save_model (pt2, traced on the float ``example``), then the
    image pyfunc: its loader in code/, the uint8 signature and example."""
    import mlflow.pytorch
    from mlflow.models.signature import infer_signature
    from mlflow.models.utils import _save_example

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        loader = Path(tmp) / f"{LOADER}.py"
        shutil.copyfile(Path(__file__).with_name("pyfunc_images.py"), loader)
        with torch.no_grad():
            output = pytorch_model(example)
        mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, input_example=example.numpy(),
                                  signature=infer_signature(example.numpy(), output.numpy()),
                                  code_paths=[str(loader)], serialization_format="pt2", **kwargs)
    pyfunc = mlflow_model.flavors["python_function"]
    pyfunc["loader_module"] = LOADER
    mlflow_model.signature = raw_signature
    for old in ("input_example.json", "serving_input_example.json"):
        (Path(path) / old).unlink(missing_ok=True)
    mlflow_model.saved_input_example_info = None
    _save_example(mlflow_model, raw_example, str(path))
    mlflow_model.save(str(Path(path) / "MLmodel"))
