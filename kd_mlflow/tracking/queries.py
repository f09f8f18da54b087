"""Reading what MLflow holds, for analysis (compare, benchmark, sweep) and for the commands
that fetch models: the client, every run of an experiment, an experiment by name or id,
and artifacts. The rest of the package reads runs through here and never imports mlflow."""

from __future__ import annotations

from pathlib import Path


def client():
    """An MlflowClient on the current tracking (and registry) URI."""
    from mlflow import MlflowClient

    return MlflowClient()


def use_tracking_uri(uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)


def search_all_runs(mlflow_client, experiment_id: str) -> list:
    """Every run of the experiment, oldest first (all pages)."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], max_results=1000, page_token=token,
                                         order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_experiment(mlflow_client, experiment: str):
    """The experiment named ``experiment`` (or with that id), or None."""
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        try:
            found = mlflow_client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - MLflow raises its own kinds for a missing id
            found = None
    return found


def experiment_of_run(mlflow_client, run_id: str) -> tuple[str, str]:
    """-> (experiment id, experiment name) of the run."""
    experiment_id = mlflow_client.get_run(run_id).info.experiment_id
    return experiment_id, mlflow_client.get_experiment(experiment_id).name


def download_artifacts(uri: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
