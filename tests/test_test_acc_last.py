"""test_acc_last: the last epoch's student, counted in fp32 on the test split. When the
best-validation epoch is the last one, the count is not computed twice (runner reuses
test_acc's); either way it must equal an independent count from the run's own
last-epoch checkpoint (runs/<run id>/last.pt), which this test makes itself."""

from __future__ import annotations

import pytest
import torch

from kd_mlflow.config import Config
from kd_mlflow.data import load_data
from kd_mlflow.models import create_model
from kd_mlflow.runner import _same_weights

from test_teacher_cache import SMALL, in_tmp, run_recorded  # noqa: F401  (in_tmp: a fixture)


def independent_count(state: dict, cfg: Config) -> int:
    """Correct test images of the student in ``state``: fp32, eval mode, plain loop."""
    data = load_data(cfg)
    model = create_model(cfg.network, data.info.num_classes, data.info.in_channels)
    model.load_state_dict(state)
    model.float().eval()
    # The same arithmetic as the package's batches ((x - 255 mean) / (255 std)): a count
    # must not move with float rounding.
    mean = torch.tensor(data.info.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(data.info.std).view(1, -1, 1, 1) * 255
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(data.test.y), 250):
            x = data.test.x[i:i + 250].float()
            correct += int((model((x - mean) / std).argmax(1) == data.test.y[i:i + 250]).sum())
    return correct


# One epoch: the best epoch is the last by construction, and its count is reused. Three
# epochs with the validation score the trainer sees forced down after the first epoch
# (the real accuracy minus 50 points per later epoch): the first epoch's student is
# selected on every CPU, so the last one differs and both are counted. Which epoch wins
# on its own depends on the CPU's kernels (AMX vs AVX2), hence the forcing.
@pytest.mark.parametrize("epochs", [1, 3])
def test_test_correct_last_is_the_last_epochs_count(in_tmp, monkeypatch, epochs):
    from kd_mlflow import trainer

    calls = []
    real_evaluate = trainer.evaluate

    def declining(model, batches, amp_dtype=None):
        acc, loss = real_evaluate(model, batches, amp_dtype)
        calls.append(acc)
        return acc - 50.0 * (len(calls) - 1), loss

    monkeypatch.setattr(trainer, "evaluate", declining)
    monkeypatch.setenv("KD_KEEP_RUN_FILES", "1")  # the finished run's last.pt and model.pt are read below
    cfg = Config.for_mode("nokd", **{**SMALL, "epochs": epochs, "seed": 1})
    run = run_recorded(cfg)
    assert len(calls) == epochs and run.last("best_epoch") == 0
    last = torch.load(in_tmp / "runs" / "nokd" / "last.pt", weights_only=False)
    student = {k[len("student."):]: v for k, v in last["distiller"].items() if k.startswith("student.")}
    assert run.last("test_correct_last") == independent_count(student, cfg)
    best = torch.load(in_tmp / "runs" / "nokd" / "model.pt", weights_only=False)
    assert run.last("test_correct") == independent_count(best["state_dict"], cfg)
    if epochs == 1:
        assert run.last("test_correct_last") == run.last("test_correct")


def test_same_weights_compares_values_not_dtypes_or_devices():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    assert _same_weights(a, {"w": torch.tensor([1.0, 2.0], dtype=torch.float64), "n": torch.tensor(3)})
    assert not _same_weights(a, {"w": torch.tensor([1.0, 2.5]), "n": torch.tensor(3)})
    assert not _same_weights(a, {"w": torch.tensor([1.0, 2.0])})
