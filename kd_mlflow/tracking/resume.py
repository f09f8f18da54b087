"""Resume lookup: the run a ``resume`` parameter continues (an id, or 'auto': the latest
unfinished run with the same settings and a checkpoint), refused before anything is
logged when there is none or its settings differ."""

from __future__ import annotations

from ..errors import ConfigError
from .health import shown_tracking_uri
from .lifecycle import _select_experiment


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
        raise ConfigError(f"cannot resume: no run {resume!r} in the tracking store "
                          f"{shown_tracking_uri()}; check the run id (and MLFLOW_TRACKING_URI)") from None
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


CELL_TAG = "kd_mlflow.cell"  # a multi-run job's cell: '<parent kind>:<cell name>' (execution/)


def unfinished_cell_runs(parent_run_id: str, cell: str) -> list:
    """The runs of ``cell`` in the experiment of ``parent_run_id`` that did not finish
    (RUNNING after a lost worker or node, KILLED by a signal), the newest first: the
    candidates a retried or re-run cell continues instead of starting a second run."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    value = cell.replace("'", "\\'")
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`{CELL_TAG}` = '{value}' and attributes.status != 'FINISHED' "
                                            f"and attributes.status != 'FAILED'",
                              order_by=["attributes.start_time DESC"], max_results=50)


def finished_cells_of_stopped_parents(parent_run_id: str, cell: str) -> list:
    """The FINISHED runs of ``cell`` in the experiment of ``parent_run_id`` that are nested
    under another run which was stopped (KILLED) or FAILED, the newest first. A stopped
    strategy (a benchmark's kdparam or allkd cell) has no checkpoint of its own, so the same
    command starts it again as a new run; its cells that had finished are these, and the
    new run adopts them instead of training them again."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    value = cell.replace("'", "\\'")
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.`{CELL_TAG}` = '{value}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1000)  # one per seed, and more
    status: dict[str, str] = {}
    found = []
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId", "")
        if not parent or parent == parent_run_id:
            continue
        if parent not in status:
            status[parent] = client.get_run(parent).info.status
        if status[parent] in ("KILLED", "FAILED"):
            found.append(run)
    return found


MODEL_CARD = "model_card.json"  # a student's serving.model_card, logged with its model


def adopt_cell_run(run, parent_run_id: str) -> tuple[str, dict] | None:
    """Nest the finished cell ``run`` under ``parent_run_id`` (the new run lists it, the
    stopped one no longer does) -> (its logged model's URI, its model card), what the
    parent needs to register it; None, and nothing changed, when the run lacks either
    (made before runs logged their card)."""
    import json
    import tempfile

    import mlflow

    client = mlflow.MlflowClient()
    models = run.outputs.model_outputs if run.outputs else []
    if len(models) != 1:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            card = json.loads(open(client.download_artifacts(run.info.run_id, MODEL_CARD, tmp)).read())
    except Exception:  # MLflow raises its own errors for a missing artifact
        return None
    client.set_tag(run.info.run_id, "mlflow.parentRunId", parent_run_id)
    return f"models:/{models[0].model_id}", card


def kill_unfinished_children(parent_run_id: str) -> list[str]:
    """Mark KILLED every child of ``parent_run_id`` still RUNNING (cells whose worker was
    stopped before it could say so) -> their run ids."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                             f"and attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")
    return [r.info.run_id for r in runs]


def run_summary(run_id: str) -> dict:
    """A run's status and its selection and test numbers (best_val_acc, test_acc), for a
    job that reads back what its cells logged."""
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    return {"status": run.info.status, **{k: run.data.metrics[k] for k in ("best_val_acc", "test_acc")
                                          if k in run.data.metrics}}


def mark_pruned(run_id: str, epoch: int, tag: str = "kd_mlflow.pruned_at_epoch") -> None:
    """A trial that early stopping ended after ``epoch`` epochs: KILLED, tagged and noted."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, tag, str(epoch))
    client.set_tag(run_id, "mlflow.note.content",
                   f"Pruned by ASHA after epoch {epoch}: its validation accuracy was below the rung's median.")
    client.set_terminated(run_id, "KILLED")
