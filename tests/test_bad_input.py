"""Bad input: a one-line error naming the problem and the fix, exit code != 0, before
any training starts and without leaving a run behind."""

from __future__ import annotations

import pickle

import pytest
import torch
from click.testing import CliRunner

from kd_mlflow.checkpoint import save_model_checkpoint
from kd_mlflow.cli import main
from kd_mlflow.models import create_model

TINY = ["--train-subset", "200", "--val-size", "100", "--test-subset", "100", "--epochs", "1", "--device", "cpu"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def invoke(args):
    return CliRunner().invoke(main, args)


def no_runs_created(workdir) -> bool:
    from mlflow import MlflowClient

    if not (workdir / "mlflow.db").exists():
        return True  # nothing ever opened the tracking store
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exps = client.search_experiments()
    return not client.search_runs([e.experiment_id for e in exps]) if exps else True


def checkpoint(path, arch="resnet8", dataset="fashion_mnist", classes=10, channels=1):
    model = create_model(arch, classes, channels)
    save_model_checkpoint(path, model, {"arch": arch, "dataset": dataset, "num_classes": classes,
                                        "in_channels": channels})
    return path


def assert_clean_error(result, *needles):
    assert result.exit_code == 2, result.output
    # MLflow's own INFO lines (creating a fresh SQLite store) are not ours to count
    lines = [l for l in result.output.strip().splitlines() if l.strip() and " INFO mlflow" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("args,needles", [
    (["train", "kd", "--dataset", "mnist"], ["unknown dataset 'mnist'", "fashion_mnist"]),
    (["train", "kd", "--student", "resnet9"], ["unknown student architecture 'resnet9'", "resnet8"]),
    (["train", "nokd", "--optimizer", "lion"], ["unknown optimizer 'lion'", "sgd"]),
    (["train", "nokd", "--scheduler", "step"], ["unknown scheduler 'step'", "cosine"]),
    (["train", "kd", "--temperature", "0"], ["temperature must be > 0"]),
    (["train", "kd", "--alpha", "1.5"], ["alpha must be in [0, 1]"]),
    (["train", "kd", "--epochs", "0"], ["epochs must be >= 1"]),
    (["train", "kd", "--batch-size", "0"], ["batch_size"]),
    (["train", "kd", "--lr", "-1"], ["lr must be > 0"]),
    (["train", "kd", "--device", "tpu"], ["unknown device 'tpu'"]),
    (["train", "kd", "--teacher-checkpoint", "nope/missing.pt"], ["nope/missing.pt does not exist", "-e teacher"]),
    (["train", "nokd", "--train-subset", "999999"], ["train_subset=999999 is larger than"]),
    (["train", "dkd", "--dkd-beta", "-1"], ["dkd_beta must be >= 0, got -1.0"]),
    (["train", "dkd", "--dkd-alpha", "-0.5"], ["dkd_alpha must be >= 0"]),
    (["train", "dkd", "--dkd-warmup", "-1"], ["dkd_warmup must be >= 0"]),
    (["train", "dist", "--dist-gamma", "-2"], ["dist_gamma must be >= 0"]),
    (["train", "dist", "--dist-beta", "-2"], ["dist_beta must be >= 0"]),
    (["train", "triplet", "--triplet-weight", "-1"], ["triplet_weight must be >= 0"]),
    (["train", "sp", "--sp-weight", "-1"], ["sp_weight must be >= 0"]),
    # the feature weights' old shared name (what `mlflow run . -e pkd -P beta=10` passes on): the new name
    (["train", "pkd", "--beta", "10"], ["mode pkd has no parameter beta (beta is now pkd_weight); pass pkd_weight"]),
    (["train", "oh", "--beta=0.001"], ["beta is now oh_weight"]),
    (["sweep", "sfd", "--param", "beta", "--values", "0.3,1"], ["mode sfd has no parameter beta (beta is now sfd_weight)"]),
    (["tune", "pkd", "--space", "beta=loguniform:1:100"], ["beta is now pkd_weight"]),
    # logits are not what feature modes compare: one line naming the modes that take it
    (["train", "oh", "--logit-standardization", "true"], ["mode oh has no parameter logit_standardization",
                                                          "kd", "dkd", "dist"]),
    (["train", "pkd", "--logit_standardization=true"], ["mode pkd has no parameter logit_standardization"]),
])
def test_bad_parameter(workdir, args, needles):
    assert_clean_error(invoke([*args, *TINY[:0]]), *needles)
    assert no_runs_created(workdir)


def test_unknown_mode_lists_modes(workdir):
    result = invoke(["train", "distill"])
    assert result.exit_code == 2 and "No such command 'distill'" in result.output


def test_teacher_for_other_classes_or_channels(workdir):
    ckpt = checkpoint(workdir / "c100.pt", dataset="cifar100", classes=100, channels=3)
    assert_clean_error(invoke(["train", "kd", "--teacher-checkpoint", str(ckpt), *TINY]),
                       "100 classes x 3 channels", "fashion_mnist has 10 x 1")
    ckpt = checkpoint(workdir / "rgb.pt", dataset="cifar10", classes=10, channels=3)
    assert_clean_error(invoke(["train", "kd", "--teacher-checkpoint", str(ckpt), *TINY]), "10 classes x 3 channels")
    assert no_runs_created(workdir)


def test_truncated_and_foreign_checkpoints(workdir):
    good = checkpoint(workdir / "good.pt")
    truncated = workdir / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    assert_clean_error(invoke(["train", "kd", "--teacher-checkpoint", str(truncated), *TINY]),
                       "truncated.pt is not a readable checkpoint")
    text = workdir / "notes.pt"
    text.write_text("not a checkpoint")
    assert_clean_error(invoke(["train", "kd", "--teacher-checkpoint", str(text), *TINY]), "notes.pt")
    plain = workdir / "plain_state_dict.pt"
    torch.save(create_model("resnet8", 10, 1).state_dict(), plain)
    assert_clean_error(invoke(["train", "kd", "--teacher-checkpoint", str(plain), *TINY]),
                       "is not a kd-mlflow checkpoint")
    assert no_runs_created(workdir)


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint would do on unpickling
        return (open, ("/tmp/kd-mlflow-pwned", "w"))


def test_pickle_payload_is_refused_not_executed(workdir):
    import os

    evil = workdir / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Payload(), "meta": {}}, f)
    if os.path.exists("/tmp/kd-mlflow-pwned"):
        os.remove("/tmp/kd-mlflow-pwned")
    assert_clean_error(invoke(["train", "kd", "--teacher-checkpoint", str(evil), *TINY]), "evil.pt")
    assert not os.path.exists("/tmp/kd-mlflow-pwned")


def test_unwritable_teacher_output(workdir):
    # A path below a regular file cannot be created, whoever runs the test (root included).
    (workdir / "a_file").write_text("")
    assert_clean_error(invoke(["teacher", "--output", str(workdir / "a_file" / "t.pt"), *TINY]),
                       "cannot write the output", "-P output=PATH")
    assert no_runs_created(workdir)


def test_mode_specific_bad_input(workdir):
    c100 = checkpoint(workdir / "c100.pt", dataset="cifar100", classes=100, channels=3)
    good = checkpoint(workdir / "good.pt")
    cases = [
        (["train", "allkd", "--teachers", " , "], ["teachers is empty"]),
        (["train", "multikd", "--ensemble", str(good)], ["ensemble of >= 2 teachers, got 1"]),
        (["train", "multikd", "--ensemble", f"{good},{c100}"], ["100 classes x 3 channels"]),
        (["train", "takd", "--assistants", "resnet9"], ["unknown assistant architecture 'resnet9'"]),
        (["train", "kdparam", "--temperatures", "2,0"], ["every temperature must be > 0"]),
        (["train", "kdparam", "--alphas", "0.5,x"], ["not a comma-separated list of numbers"]),
        (["train", "ab", "--epochs", "1"], ["ab needs more epochs"]),
        (["train", "uda", "--labeled-fraction", "0"], ["labeled_fraction must be in (0, 1]"]),
        (["train", "kd", "--teacher-checkpoint", "models:/no-such-model/1"], ["cannot fetch models:/no-such-model/1"]),
    ]
    for args, needles in cases:
        assert_clean_error(invoke([*args, *TINY]), *needles)
    # the models:/ lookup opened the tracking store: it must hold no run
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_missing_dataset_without_network_names_the_fix(workdir):
    # CIFAR-10 is not on this machine and nothing can be downloaded here: a clear error.
    result = invoke(["train", "nokd", "--dataset", "cifar10", "--data-dir", str(workdir / "empty"), *TINY])
    assert_clean_error(result, "dataset cifar10 is not on this machine", "data_dir")


def test_a_run_that_fails_mid_way_records_its_reason(tmp_path, monkeypatch, own_tracking_uri):
    """An exception inside an open run ends it FAILED with the reason where the UI shows it
    (the description and the tag kd_mlflow.error), beside error/traceback.txt."""
    import mlflow

    from kd_mlflow.tracking import start_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    own_tracking_uri(uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError):
        with start_run({"experiment": "fails"}, {"mode": "kd"}, run_name="fails") as tracker:
            run_id = tracker.run_id
            raise RuntimeError("the loss became NaN at epoch 3\nsecond line")
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["kd_mlflow.error"] == "RuntimeError: the loss became NaN at epoch 3"
    assert run.data.tags["mlflow.note.content"] == "**Failed:** RuntimeError: the loss became NaN at epoch 3"
