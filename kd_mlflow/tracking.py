"""All of MLflow lives here. Everything else receives a tracker with a few methods.

Run ownership: under ``mlflow run`` the entry point logs into the run MLflow created
(``MLFLOW_RUN_ID``), never a second top-level run; launched directly, we create it.
Multi-stage modes open nested child runs with ``tracker.child(...)``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from pathlib import Path

DEFAULT_EXPERIMENT = "kd-mlflow"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class NullTracker:
    """Tracker that records nothing (benchmarks measure the trainer without MLflow)."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_dict(self, obj, path: str) -> None: ...
    def log_figure(self, fig, path: str) -> None: ...
    def log_artifact(self, local_path, artifact_path: str | None = None) -> None: ...

    def log_model(self, *args, **kwargs):
        return None, None

    def register(self, model_uri: str, name: str):
        return None

    @contextlib.contextmanager
    def child(self, name: str, tags: dict | None = None):
        yield self


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_PACKAGE_ROOT, capture_output=True,
                             text=True, timeout=5)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_PACKAGE_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pip_requirements() -> list[str]:
    import mlflow
    import numpy
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={numpy.__version__}"]


def _warm_model_logging() -> None:
    """The one-off costs of the first log_model in a process, paid on a side thread
    while the epochs train (torch ops release the GIL) instead of at the end: the
    imports behind torch.export (pt2 tracing pulls in torch._dynamo) and MLflow's map of
    installed distributions (a scan of every installed file, which MLflow caches)."""
    with contextlib.suppress(Exception):
        import importlib

        importlib.import_module("mlflow.pytorch")
        importlib.import_module("torch.export._trace")
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()


class MlflowTracker:
    _warming: threading.Thread | None = None

    def __init__(self, run_id: str):
        self.run_id = run_id
        if MlflowTracker._warming is None:
            MlflowTracker._warming = threading.Thread(target=_warm_model_logging, name="warm-log-model",
                                                      daemon=True)
            MlflowTracker._warming.start()

    def log_params(self, params: dict) -> None:
        import mlflow

        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import mlflow

        # Asynchronous: the epoch loop never waits on the tracking server.
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=False)

    def log_dict(self, obj, path: str) -> None:
        import mlflow

        mlflow.log_dict(obj, path)

    def log_figure(self, fig, path: str) -> None:
        import matplotlib.pyplot as plt
        import mlflow

        mlflow.log_figure(fig, path)
        plt.close(fig)

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(local_path), artifact_path)

    def log_model(self, model, example, *, registered_name: str | None, checkpoint: Path | None = None,
                  name: str = "model"):
        """Log ``model`` (an nn.Module, moved to CPU fp32) in MLflow's pickle-free pt2 format,
        with signature, input example and explicit requirements (inferring them costs ~30 s),
        plus the kd-mlflow checkpoint so the registered model can serve as a teacher.
        Returns (model_uri, registered version or None)."""
        import mlflow
        import torch
        from mlflow.models import infer_signature

        if MlflowTracker._warming is not None:
            MlflowTracker._warming.join()
        model = model.eval()
        with torch.no_grad():
            output = model(example)
        example_np = example.numpy()
        signature = infer_signature(example_np, output.numpy())
        info = mlflow.pytorch.log_model(
            model, name=name, input_example=example_np, signature=signature,
            pip_requirements=pip_requirements(), serialization_format="pt2",
            registered_model_name=registered_name or None,
            extra_files=[str(checkpoint)] if checkpoint else None,
        )
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            from .registry import update_champion

            update_champion(mlflow.MlflowClient(), registered_name)
        return info.model_uri, (int(version) if version is not None else None)

    def register(self, model_uri: str, name: str) -> int:
        """Register an already logged model (e.g. the best child of a sweep) under ``name``."""
        import mlflow

        from .registry import update_champion

        version = int(mlflow.register_model(model_uri, name).version)
        update_champion(mlflow.MlflowClient(), name)
        return version

    @contextlib.contextmanager
    def child(self, name: str, tags: dict | None = None):
        """A nested run under this one. Created explicitly with its parent id: under
        `mlflow run`, MLFLOW_RUN_ID is set, and a plain start_run(nested=True) would
        resume the parent itself instead of opening a child."""
        import mlflow
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client = mlflow.MlflowClient()
        experiment_id = client.get_run(self.run_id).info.experiment_id
        created = client.create_run(experiment_id, run_name=name,
                                    tags={**(tags or {}), MLFLOW_PARENT_RUN_ID: self.run_id})
        run = mlflow.start_run(run_id=created.info.run_id, nested=True)
        with _lifecycle(MlflowTracker(run.info.run_id)) as child:
            yield child


def _select_experiment(experiment: str) -> None:
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        return  # the run exists already; its experiment was chosen by `mlflow run`
    if experiment:
        mlflow.set_experiment(experiment)
    elif not (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
        mlflow.set_experiment(DEFAULT_EXPERIMENT)


def _same_value(logged: str, value) -> bool:
    if isinstance(value, bool):
        return logged.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(logged) == float(value)
        except ValueError:
            return False
    return logged.strip("'") == str(value)  # `mlflow run` logs an empty value as ''


def resumable_run(params: dict, resume: str, has_checkpoint) -> str:
    """The run id to continue: ``resume`` itself, or for 'auto' the latest unfinished run
    of the experiment with the same params whose checkpoint ``has_checkpoint(run_id)``.
    Raises ConfigError (before anything is logged) when there is none or settings differ."""
    import mlflow

    from .config import ConfigError

    client = mlflow.MlflowClient()

    def differences(run) -> list[str]:
        return [f"{k}: {run.data.params.get(k)!r} -> {v!r}" for k, v in params.items()
                if k in run.data.params and not _same_value(run.data.params[k], v)]

    if resume == "auto":
        _select_experiment(params.get("experiment", ""))
        exp_id = mlflow.tracking.fluent._get_experiment_id()
        runs = client.search_runs([exp_id], filter_string="attributes.status != 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=200)
        for run in runs:
            if run.data.params.get("mode") == params["mode"] and not differences(run) and has_checkpoint(run.info.run_id):
                return run.info.run_id
        raise ConfigError("resume=auto found no unfinished run with the same settings and a checkpoint in "
                          "./runs; start a new run (drop -P resume) or pass the run id")
    try:
        run = client.get_run(resume)
    except Exception:
        raise ConfigError(f"cannot resume: no run {resume!r} in the tracking store {mlflow.get_tracking_uri()}; "
                          f"check the run id (and MLFLOW_TRACKING_URI)") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {resume} already FINISHED; there is nothing to resume")
    diff = differences(run)
    if diff:
        raise ConfigError(f"run {resume} was made with other settings ({'; '.join(diff[:4])}); "
                          f"resume with the parameters it was started with")
    if not has_checkpoint(resume):
        raise ConfigError(f"run {resume} has no epoch checkpoint in ./runs/{resume}/last.pt; resume from the "
                          f"directory the run was started in (it finished no epoch if the file never existed)")
    return resume


@contextlib.contextmanager
def start_run(params: dict, tags: dict, run_name: str | None = None, run_id: str | None = None):
    """Open (or, under ``mlflow run``, adopt) the run; log params and tags; yield a tracker.

    An exception inside marks the run FAILED and stores the traceback as an artifact;
    Ctrl-C marks it KILLED. No error path leaves a run RUNNING."""
    import mlflow

    _select_experiment(params.get("experiment", ""))
    launcher_run = os.environ.get("MLFLOW_RUN_ID")
    if run_id and launcher_run and launcher_run != run_id:
        # `mlflow run -P resume=ID` made a fresh run; the training continues in run ID.
        mlflow.MlflowClient().set_tag(launcher_run, "kd_mlflow.resumed_run_id", run_id)
    run_id = run_id or launcher_run
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
    with _lifecycle(MlflowTracker(run.info.run_id)) as tracker:
        if run_id:
            # `mlflow run` has already logged the entry point's parameters (as the user
            # typed them, e.g. lr=.1 or '' for empty); MLflow forbids changing a param,
            # so only what it did not log is added.
            params = {k: v for k, v in params.items() if k not in run.data.params}
        tracker.log_params(params)
        tracker.set_tags({**tags, "git_commit": git_commit()})
        yield tracker


@contextlib.contextmanager
def _lifecycle(tracker: MlflowTracker):
    """End the active run (the one ``tracker`` logs to) with the status its body earned:
    FINISHED; KILLED on Ctrl-C/SIGTERM/sys.exit(!=0); FAILED on any other exception,
    with the traceback logged as ``error/traceback.txt``. Never left RUNNING."""
    import traceback

    import mlflow

    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, SystemExit) and exc.code not in (0, None) else "FAILED"
        with contextlib.suppress(Exception):
            mlflow.log_text(traceback.format_exc(), "error/traceback.txt")
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.flush_async_logging()
        mlflow.end_run(status=status)

