"""A registered student explains itself and serves real images (issue 15, points 1, 2, 4).

Real components only: the session's `mlflow server` (conftest), a real kd training
through the `kd-mlflow` CLI in a subprocess, `mlflow models serve --env-manager local` on
127.0.0.1, and real Fashion-MNIST test images posted as uint8.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import BIN, free_port, unique_experiment, wait_for_http

# Written out here, not imported: what a user reads in docs/serving.md.
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
MEAN, STD = 0.2860, 0.3530
N_TEST, N_TRAIN, N_VAL, SEED = 600, 1000, 500, 3


@pytest.fixture(scope="module")
def student(mlflow_server, tmp_path_factory):
    """kd from the committed resnet20, registered; system metrics sampled every second."""
    workdir = tmp_path_factory.mktemp("serving")
    experiment = unique_experiment("serving")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    cmd = [str(BIN / "kd-mlflow"), "train", "kd", "--teacher", "pretrained:fashion_mnist-resnet20",
           "--train-subset", str(N_TRAIN), "--val-size", str(N_VAL), "--test-subset", str(N_TEST),
           "--epochs", "3", "--batch-size", "100", "--seed", str(SEED), "--device", "cpu", "--precision", "fp32",
           "--experiment", experiment, "--registered-model", experiment]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    return {"client": client, "run": run, "name": experiment, "uri": f"models:/{experiment}/1",
            "server": mlflow_server, "env": env, "workdir": workdir}


def _test_images():
    from kd_mlflow.data import load_arrays

    _, _, x, y = load_arrays("fashion_mnist")
    return x[:N_TEST, 0], y[:N_TEST]  # N x 28 x 28 uint8, as the IDX file stores them


def test_logged_model_is_named_and_carries_the_selected_epoch(student):
    client, run = student["client"], student["run"]
    assert run.info.run_name == "kd-resnet8"
    (output,) = run.outputs.model_outputs
    best_epoch = int(run.data.metrics["best_epoch"])
    assert output.step == best_epoch
    model = client.get_logged_model(output.model_id)
    assert model.name == "kd-resnet8"
    metrics = {m.key: m.value for m in model.metrics}
    val_history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
    assert all(m.step == best_epoch for m in model.metrics)
    assert metrics["val_acc"] == val_history[best_epoch] == run.data.metrics["best_val_acc"]
    assert (metrics["test_correct"], metrics["test_images"]) == (run.data.metrics["test_correct"], N_TEST)
    assert metrics["test_acc"] == run.data.metrics["test_acc"]


def test_registered_version_has_description_tags_and_metadata(student, tracking):
    client, run = student["client"], student["run"]
    version = client.get_model_version(student["name"], "1")
    correct = int(run.data.metrics["test_correct"])
    acc = f"{100 * correct / N_TEST:.2f}"
    assert version.tags == {"mode": "kd", "dataset": "fashion_mnist", "student": "resnet8", "teacher": "resnet20",
                            "test_acc": acc}
    text = version.description
    for expected in ("`kd`", "resnet20 (test_acc 93.94%)", f"test_acc {acc}% ({correct}/{N_TEST}",
                     run.info.run_id, f'mlflow.pyfunc.load_model("{student["uri"]}")',
                     f'mlflow.pytorch.load_model("{student["uri"]}")', "0.286", "0.353", ".eval()"):
        assert expected in text, (expected, text)
    import mlflow.pyfunc

    card = mlflow.pyfunc.load_model(student["uri"]).metadata.metadata["kd_mlflow"]
    assert card["class_names"] == CLASSES and card["dataset"] == "fashion_mnist"
    assert card["normalization"]["mean"] == [MEAN] and card["normalization"]["std"] == [STD]
    assert card["input"] == {"dtype": "uint8", "range": [0, 255], "layout": "N x H x W", "channels": 1,
                             "height": 28, "width": 28}


def test_datasets_name_the_exact_images(student):
    import torch

    inputs = {d.tags[0].value: d.dataset for d in student["run"].inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    # The split, worked out here: a permutation of the 60,000 training images seeded by
    # the seed; the first val_size validate, the next train_subset train.
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(SEED)).numpy().astype(np.int64)
    expected = {"train": perm[N_VAL:N_VAL + N_TRAIN], "validation": perm[:N_VAL], "test": np.arange(N_TEST)}
    for context, idx in expected.items():
        digest = hashlib.sha256(f"fashion_mnist/{context}/".encode() + idx.tobytes()).hexdigest()[:32]
        assert inputs[context].digest == digest, context
        assert inputs[context].name == f"fashion_mnist-{context}"
        assert json.loads(inputs[context].profile)["num_rows"] == len(idx)
        assert json.loads(inputs[context].source)["uri"]


def test_system_metrics_are_logged_and_can_be_turned_off(student, tmp_path):
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        student["run"].data.metrics)
    experiment = unique_experiment("no-system")
    cmd = [str(BIN / "kd-mlflow"), "train", "nokd", "--train-subset", "300", "--val-size", "200",
           "--test-subset", "200", "--epochs", "2", "--device", "cpu", "--precision", "fp32",
           "--system-metrics", "false", "--experiment", experiment]
    proc = subprocess.run(cmd, cwd=tmp_path, env=student["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = student["client"]
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.params["system_metrics"] == "False"
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    # a FINISHED run leaves nothing in runs/: its model (with the checkpoint) is in MLflow
    assert not (tmp_path / "runs" / run.info.run_id).exists()
    # a smoke run (a subset) is a logged model, not a registered one, unless it is named
    assert run.outputs.model_outputs
    assert not client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert "registered    no: a smoke run (train_subset=300, test_subset=200); name it with --registered-model" \
        in proc.stdout


def test_pyfunc_takes_uint8_images_and_returns_class_names(student, tracking):
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException

    x, y = _test_images()
    predictions = mlflow.pyfunc.load_model(student["uri"]).predict(x)
    assert list(predictions.columns) == ["label", "class_index", "probability"]
    assert int((predictions["class_index"].to_numpy() == y).sum()) == int(student["run"].data.metrics["test_correct"])
    assert [CLASSES[i] for i in predictions["class_index"]] == list(predictions["label"])
    assert ((predictions["probability"] > 0) & (predictions["probability"] <= 1)).all()
    # the network, for logits: normalised float input, as docs/serving.md says
    network = mlflow.pytorch.load_model(student["uri"])
    with torch.no_grad():
        logits = network((torch.tensor(x).float().unsqueeze(1) / 255 - MEAN) / STD)
    assert logits.argmax(1).tolist() == predictions["class_index"].tolist()
    with pytest.raises(MlflowException, match="uint8"):
        mlflow.pyfunc.load_model(student["uri"]).predict(x.astype(np.float32) / 255)


def _post(url: str, payload, content_type: str = "application/json") -> tuple[int, dict]:
    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_mlflow_models_serve_answers_every_format_with_class_names(student, tracking):
    """Each request format MLflow's scoring server documents for tensors and DataFrames
    (inputs, instances, dataframe_split, dataframe_records, CSV), in each image layout a
    user has (N x H x W as the IDX file stores them, N x 1 x H x W, channels-last
    N x H x W x 1, one H x W image, 784 pixel columns): the same answers as the pyfunc
    in process. A refused request's body is one line that says what is wrong, first."""
    import mlflow.pyfunc

    x, _ = _test_images()
    x = x[:16]
    expected = mlflow.pyfunc.load_model(student["uri"]).predict(x)
    labels, indices = list(expected["label"]), list(expected["class_index"])
    pixels = x.reshape(len(x), -1)
    columns = [f"pixel{i}" for i in range(pixels.shape[1])]
    requests = {
        "inputs N x H x W": ({"inputs": x.tolist()}, len(x)),
        "inputs N x 1 x H x W": ({"inputs": x[:, None].tolist()}, len(x)),
        "inputs N x H x W x 1": ({"inputs": x[..., None].tolist()}, len(x)),
        "inputs one H x W image": ({"inputs": x[0].tolist()}, 1),
        "instances": ({"instances": x.tolist()}, len(x)),
        "dataframe_split, a column of images": (
            {"dataframe_split": {"columns": ["image"], "data": [[image.tolist()] for image in x]}}, len(x)),
        "dataframe_split, 784 pixel columns": (
            {"dataframe_split": {"columns": columns, "data": pixels.tolist()}}, len(x)),
        "dataframe_records": ({"dataframe_records": [{"image": image.tolist()} for image in x]}, len(x)),
        "CSV, 784 pixel columns": (",".join(columns) + "\n" + "\n".join(",".join(map(str, row)) for row in pixels),
                                   len(x)),
    }
    port = free_port()
    log = open(student["workdir"] / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", student["uri"], "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=student["workdir"], env=student["env"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc)
        url = f"http://127.0.0.1:{port}/invocations"
        for name, (payload, n) in requests.items():
            status, body = _post(url, payload, "text/csv" if name.startswith("CSV") else "application/json")
            assert status == 200, (name, body)
            served = body["predictions"]
            assert [p["label"] for p in served] == labels[:n], name
            assert [p["class_index"] for p in served] == indices[:n], name
        refused = {
            # wrong size: the sizes, and the layouts the model takes
            "(channels x height x width)": {"inputs": x[:2, :, :20].tolist()},
            # images scaled to [0, 1]
            "not images scaled to [0, 1]": {"inputs": (x[:2] / 255).tolist()},
            # values that are no uint8 at all
            "raw uint8 0-255; got values from": {"inputs": (x[:2].astype(np.int64) + 300).tolist()},
            # pixel columns of another size
            "a DataFrame of 700 scalar columns": {"dataframe_split": {"columns": columns[:700],
                                                                       "data": pixels[:2, :700].tolist()}},
            # a black image (or one scaled to 0/1 that became whole numbers)
            "has no pixel above 2": {"inputs": np.zeros((2, 28, 28), np.uint8).tolist()},
        }
        for start, payload in refused.items():
            status, body = _post(url, payload)
            assert status == 400, (start, body)
            message = body["message"]
            assert start in message.splitlines()[0] and len(message) < 400, (start, message)
            assert "Failed to predict data" not in message, message  # no dump of the request first
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and its uvicorn worker
        proc.wait(timeout=60)
        log.close()
