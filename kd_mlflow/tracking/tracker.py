"""The tracker the rest of kd-mlflow receives: ``MlflowTracker`` logs one run (params,
tags, batched metrics, artifacts, datasets, log_model + registry, system metrics, nested
children), and falls back to the offline directory when the server stays away;
``NullTracker`` records nothing. ``_lifecycle`` ends a run with the status its body earned."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from .health import _Link, _no_http_retries, _say, redact, server_up
from .metrics import _MetricBuffer, _OfflineMetrics
from .offline import _Offline

SYSTEM_METRICS_INTERVAL = 10.0  # seconds between samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides)


def dataset_inputs(datasets: list) -> list:
    """MLflow DatasetInputs for data.DataBundle.datasets() entries: metadata only (the
    images stay where they are), with the split as MLflow's dataset context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                 source=json.dumps({"uri": d["source"]}),
                                 profile=json.dumps({"num_rows": d["rows"], "image": d["image"],
                                                     "indices_into": f"the {d['file']} file"})),
                         tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]


class NullTracker:
    """Tracker that records nothing (benchmarks measure the trainer without MLflow)."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def flush_metrics(self, timeout: float = 60.0) -> bool: return True
    def backfill(self, history: list) -> None: ...
    def log_dict(self, obj, path: str) -> None: ...
    def log_figure(self, fig, path: str) -> None: ...
    def log_artifact(self, local_path, artifact_path: str | None = None) -> None: ...
    def log_datasets(self, datasets: list) -> None: ...
    def monitor_system(self, interval: float = 0) -> None: ...

    def log_model(self, *args, **kwargs):
        return None, None

    def register(self, model_uri: str, name: str, card: dict | None = None):
        return None

    @contextlib.contextmanager
    def child(self, name: str, tags: dict | None = None):
        yield self


def pip_requirements() -> list[str]:
    import PIL
    import mlflow
    import numpy
    import pandas
    import torch

    # pandas: the image pyfunc answers with a DataFrame; pillow: it resizes an image folder
    # model's images as evaluation did (pyfunc_images.py)
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}", f"pillow=={PIL.__version__}"]


def _warm_model_logging() -> None:
    """The one-off costs of the first log_model in a process, paid on a side thread
    while the epochs train (torch ops release the GIL) instead of at the end: the
    imports behind torch.export (pt2 tracing pulls in torch._dynamo), the plotting stack,
    and MLflow's map of installed distributions (a scan of every installed file, which
    MLflow caches)."""
    with contextlib.suppress(Exception):
        import importlib

        importlib.import_module("mlflow.pytorch")
        importlib.import_module("torch.export._trace")
        importlib.import_module("kd_mlflow.analysis.plots")  # seaborn and scipy, for the end-of-run figures
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()


class MlflowTracker:
    _warming: threading.Thread | None = None

    def __init__(self, run_id: str, *, offline_only: bool = False):
        """``offline_only``: a run created offline (the server does not know ``run_id``):
        everything it logs goes to its offline directory, whether the server is back or not."""
        import mlflow

        self.run_id = run_id
        self.link = _Link.of(mlflow.get_tracking_uri())
        self.offline = _Offline(run_id, self.link)
        self.offline_only = offline_only
        self.metrics = (_OfflineMetrics(self.offline) if offline_only
                        else _MetricBuffer(run_id, self.link, self.offline))
        self._system = None
        if MlflowTracker._warming is None:
            MlflowTracker._warming = threading.Thread(target=_warm_model_logging, name="warm-log-model",
                                                      daemon=True)
            MlflowTracker._warming.start()

    def _client(self):
        import mlflow

        return mlflow.MlflowClient()

    def _reach(self, fn, what: str):
        """-> (True, fn()) once the server takes it; (False, None) when it never came back,
        and at once for a run created offline."""
        if self.offline_only:
            return False, None
        return self.link.call(fn, what)

    def _call(self, what: str, fn, fallback):
        done, value = self._reach(fn, what)
        if done:
            return value
        fallback()
        return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        params = {k: ("" if v is None else str(v)) for k, v in params.items()}
        self._call("params", lambda: self._client().log_batch(
            self.run_id, params=[Param(k, v) for k, v in params.items()], synchronous=True),
            lambda: self.offline.add("params", params))

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        tags = {k: str(v) for k, v in tags.items()}
        self._call("tags", lambda: self._client().log_batch(
            self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True),
            lambda: self.offline.add("tags", tags))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.add(metrics, step)  # returns at once; a daemon thread delivers

    def flush_metrics(self, timeout: float = 60.0) -> bool:
        """Wait until the metrics logged so far have reached the server (at most
        ``timeout`` s: during an outage they stay buffered) -> whether they all have."""
        return self.metrics.flush(timeout)

    def backfill(self, history: list) -> None:
        """Log the epochs of ``history`` (one metrics dict per epoch, as in a checkpoint)
        whose metrics the run lacks."""
        def logged_epochs():
            return {m.step for m in self._client().get_metric_history(self.run_id, "train_loss")}

        done, logged = self._reach(logged_epochs, "the metric history")
        for epoch, metrics in enumerate(history if done else []):
            if epoch not in logged:
                self.log_metrics(metrics, step=epoch)

    def _log_file(self, artifact_path: str, write, upload) -> None:
        def keep():
            write(self.offline.path_for(artifact_path))
            self.offline.add_file(artifact_path)

        self._call(artifact_path, upload, keep)

    def log_dict(self, obj, path: str) -> None:
        self._log_file(path, lambda target: target.write_text(json.dumps(obj, indent=2, default=str)),
                       lambda: self._client().log_dict(self.run_id, obj, path))

    def log_text(self, text: str, path: str) -> None:
        self._log_file(path, lambda target: target.write_text(text),
                       lambda: self._client().log_text(self.run_id, text, path))

    def log_figure(self, fig, path: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self._log_file(path, lambda target: fig.savefig(target),
                           lambda: self._client().log_figure(self.run_id, fig, path))
        finally:
            plt.close(fig)

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        name = Path(local_path).name
        self._log_file(f"{artifact_path}/{name}" if artifact_path else name,
                       lambda target: shutil.copyfile(local_path, target),
                       lambda: self._client().log_artifact(self.run_id, str(local_path), artifact_path))

    def log_datasets(self, datasets: list) -> None:
        """The run's Datasets (data.DataBundle.datasets): train, validation and test."""
        if datasets:
            self._call("the datasets", lambda: self._log_inputs(dataset_inputs(datasets)),
                       lambda: [self.offline.add("datasets", d) for d in datasets])

    def _log_inputs(self, inputs) -> None:
        """log_inputs, once more when another run of the experiment created the same dataset
        at the same moment: the server then refuses the second insert of the (experiment,
        name, digest) row (seen with `benchmark --jobs 2`, two cells starting together),
        and the retry links the row that now exists."""
        from mlflow.exceptions import MlflowException

        for attempt in range(3):
            try:
                return self._client().log_inputs(self.run_id, inputs)
            except MlflowException as exc:
                if ("UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc)) or attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def log_model(self, model, example, *, registered_name: str | None, checkpoint: Path | None = None,
                  name: str = "model", card: dict | None = None, raw_example=None):
        """Log ``model`` (an nn.Module, moved to CPU fp32) in MLflow's pickle-free pt2 format,
        with explicit requirements (inferring them costs ~30 s), plus the kd-mlflow
        checkpoint so the registered model can serve as a teacher.

        With a ``card`` (serving.model_card) and ``raw_example`` (uint8 images as the
        dataset stores them), the model explains itself: metadata, the image pyfunc
        (uint8 in, class names out) with its signature and example, attached to the run
        at the selected epoch (``card["step"]``, so its metrics are that epoch's and the
        final ones logged at that step), and, when registered, the version's description
        and tags. Returns (model_uri, registered version or None); (None, None) when the
        server never came back (checkpoint, examples and card then wait in the offline
        directory)."""
        def keep():
            import torch

            entry = {"name": name, "registered_name": registered_name or None, "card": card}
            if checkpoint is not None:
                shutil.copyfile(checkpoint, self.offline.path_for(f"_model/{name}/{Path(checkpoint).name}"))
                entry["checkpoint"] = f"_model/{name}/{Path(checkpoint).name}"
            torch.save(example.detach().cpu(), self.offline.path_for(f"_model/{name}/example.pt"))
            entry["example"] = f"_model/{name}/example.pt"
            if raw_example is not None:
                torch.save(torch.as_tensor(raw_example), self.offline.path_for(f"_model/{name}/raw_example.pt"))
                entry["raw_example"] = f"_model/{name}/raw_example.pt"
            self.offline.add("models", entry)

        result = self._call(f"the model {name!r}", lambda: self._log_model(model, example, registered_name,
                                                                          checkpoint, name, card, raw_example), keep)
        return result if result is not None else (None, None)

    def _log_model(self, model, example, registered_name, checkpoint, name, card=None, raw_example=None):
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        if MlflowTracker._warming is not None:
            MlflowTracker._warming.join()
        # Everything logged so far must be in the run: MLflow attaches the run's metrics at
        # the model's step to the logged model, and the champion alias is chosen by the
        # versions' test_acc.
        self.metrics.flush()
        model = model.eval()
        common = {"pip_requirements": pip_requirements(), "registered_model_name": registered_name or None,
                  "extra_files": [str(checkpoint)] if checkpoint else None}
        if card is not None and raw_example is not None:
            from mlflow.models import Model

            from . import serving

            info = Model.log(None, name=name, flavor=serving, flavor_name="pytorch", metadata=card["metadata"],
                             step=int(card.get("step", 0)), pytorch_model=model, example=example,
                             raw_example=np.asarray(raw_example, dtype=np.uint8),
                             raw_signature=serving.raw_signature(card), **common)
        else:  # an offline directory written before models carried a card
            with torch.no_grad():
                output = model(example)
            info = mlflow.pytorch.log_model(
                model, name=name, input_example=example.numpy(), signature=infer_signature(example.numpy(),
                                                                                             output.numpy()),
                serialization_format="pt2", **common)
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            from .registry import describe_version, update_champion

            describe_version(mlflow.MlflowClient(), registered_name, int(version), card)
            update_champion(mlflow.MlflowClient(), registered_name)
        return info.model_uri, (int(version) if version is not None else None)

    def register(self, model_uri: str | None, name: str, card: dict | None = None) -> int | None:
        """Register an already logged model (e.g. the best child of a sweep) under ``name``,
        described by ``card`` (serving.model_card of the run that logged it), as a version
        of this run: the run that selected it lists it and lends it its test_acc."""
        from .registry import register_version

        def register():
            self.metrics.flush()  # as in _log_model: this run's test_acc first
            return register_version(None, model_uri, name, card, run_id=self.run_id)

        if model_uri is None:  # its run's model is itself waiting in an offline directory
            _say(f"warning: not registering {name}: the model was never uploaded; register it after "
                 f"`kd-mlflow sync` with `mlflow.register_model`")
            return None
        return self._call(f"the registration of {name}", register,
                          lambda: self.offline.add("registrations", {"model_uri": model_uri, "name": name,
                                                                     "card": card, "own_run": True}))

    @contextlib.contextmanager
    def child(self, name: str, tags: dict | None = None, run_id: str | None = None):
        """A nested run under this one (``run_id``: an unfinished child continued, e.g. a
        cell retried after its worker was lost; it is re-parented here when an earlier
        job started it). Created explicitly with its parent id: under
        `mlflow run`, MLFLOW_RUN_ID is set, and a plain start_run(nested=True) would
        resume the parent itself instead of opening a child.

        When the server does not come back within the outage wait (or this run was itself
        created offline), the child is created offline: it trains and logs into its
        offline directory under a fresh id, and `kd-mlflow sync` creates it under its parent."""
        import mlflow
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        def create():
            client = mlflow.MlflowClient()
            experiment_id = client.get_run(self.run_id).info.experiment_id
            return client.create_run(experiment_id, run_name=name,
                                     tags={**(tags or {}), MLFLOW_PARENT_RUN_ID: self.run_id})

        if run_id is not None:
            client = mlflow.MlflowClient()
            client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, self.run_id)
            for key, value in (tags or {}).items():
                client.set_tag(run_id, key, str(value))
            mlflow.start_run(run_id=run_id, nested=True)
            child = MlflowTracker(run_id)
            child.offline.record.update(experiment_name=self.offline.record["experiment_name"],
                                        parent_run_id=self.run_id)
            with _lifecycle(child) as tracker:
                yield tracker
            return
        done, created = self._reach(create, f"the nested run {name!r}")
        if done:
            mlflow.start_run(run_id=created.info.run_id, nested=True)
            child = MlflowTracker(created.info.run_id)
        else:
            child = MlflowTracker(uuid.uuid4().hex, offline_only=True)
            # The parent goes into the record, not the tags: it may be an offline id too,
            # which sync replaces by the run it became.
            child.offline.record.update(created_offline=True, run_name=name, start_time=int(time.time() * 1000))
            child.offline.add("tags", {k: str(v) for k, v in (tags or {}).items()})
            _say(f"tracking server {self.link.shown} is away: the nested run {name!r} starts offline as "
                 f"{child.run_id}; `kd-mlflow sync` creates it under run {self.run_id} when the server is back")
        child.offline.record.update(experiment_name=self.offline.record["experiment_name"],
                                    parent_run_id=self.run_id)
        with _lifecycle(child) as tracker:
            yield tracker

    def monitor_system(self, interval: float = SYSTEM_METRICS_INTERVAL) -> None:
        """MLflow's system metrics for this run (system/cpu_utilization_percentage,
        system/system_memory_usage_megabytes, disk, network, and system/gpu_* where pynvml
        sees a GPU), sampled every ``interval`` s until close(); a resumed run continues
        their steps. MLflow's monitor talks to the server itself: during an outage it stops
        (with MLflow's warning) and the training goes on."""
        if self.offline_only or self._system is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=True)
            self._system.start()
        except Exception as exc:  # psutil missing, a platform psutil cannot read, ...
            _say(f"warning: no system metrics for this run ({type(exc).__name__}: {redact(str(exc))[:160]}); "
                 f"pass -P system_metrics=false to silence this")
            self._system = None

    def close(self, status: str) -> Path | None:
        """Deliver the buffered metrics and end the active run (this one) with ``status``;
        if the server never came back, save the offline directory and return it."""
        import mlflow

        if self._system is not None:
            with contextlib.suppress(Exception):
                self._system.finish()
        self.metrics.close()

        def end():
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)  # pops the local run stack, then tells the server
            else:  # an earlier attempt popped it and then lost the server
                self._client().set_terminated(self.run_id, status)

        done, _ = self._reach(end, "the run status")
        if not done:
            self.offline.add("status", status)
            self.offline.add("end_time", int(time.time() * 1000))
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                with _no_http_retries(), contextlib.suppress(Exception):
                    mlflow.end_run(status=status)  # pops the local run stack; the server call fails fast
        saved = self.offline.save()
        if saved is not None:
            _say(f"run {self.run_id}: what the tracking server missed is in {saved}; upload it with "
                 f"`kd-mlflow sync {saved}` when the server is back")
        return saved


FAILURE_TAG = "kd_mlflow.error"


def record_failure(message: str, run_id: str | None = None) -> None:
    """Put a failed run's one-line reason where the MLflow UI shows it: the run's
    description (``mlflow.note.content``) and the tag ``kd_mlflow.error``. For a run that
    ``mlflow run`` created and that failed before kd-mlflow opened it (bad input), the run
    is MLFLOW_RUN_ID's. Best effort, and never a wait: nothing is sent to a server that
    does not answer its health check (that failure is itself the reason)."""
    import mlflow

    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        if not server_up(mlflow.get_tracking_uri()):
            return
        client = mlflow.MlflowClient()
        line = redact(message.strip().splitlines()[0] if message.strip() else "failed")[:500]
        client.set_tag(run_id, FAILURE_TAG, line)
        client.set_tag(run_id, "mlflow.note.content", f"**Failed:** {line}")
    except Exception:
        pass


@contextlib.contextmanager
def _lifecycle(tracker: MlflowTracker):
    """End the active run (the one ``tracker`` logs to) with the status its body earned:
    FINISHED; KILLED on Ctrl-C/SIGTERM/sys.exit(!=0); FAILED on any other exception,
    with the traceback logged as ``error/traceback.txt``. Never left RUNNING (unless the
    tracking server is gone; then the status waits in the offline directory)."""
    import traceback

    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, SystemExit) and exc.code not in (0, None) else "FAILED"
        with contextlib.suppress(Exception):
            tracker.log_text(redact(traceback.format_exc()), "error/traceback.txt")  # readable by all the server's users
        if status == "FAILED" and tracker.run_id:
            record_failure(f"{type(exc).__name__}: {exc}", tracker.run_id)
        raise
    finally:
        tracker.close(status)
