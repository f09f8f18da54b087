"""``kd-mlflow sync DIR``: upload what a tracking server missed during an outage.

A run whose server never came back leaves ``runs/<run_id>/offline/`` (see tracking/offline.py):
run.json (params, tags, artifacts, models, registrations, final status), metrics.jsonl
and files/. Sync logs them into the same run when the server knows it, else into a new
run of the same experiment (tagged ``kd_mlflow.synced_from``). A nested run that was
created offline (a sweep's stage opened while the server was away) becomes a new run
nested under its parent: the parent's own run, or the run its offline directory was
synced to when the parent was created offline too (parents are synced first). Each
finished step is recorded in run.json, so an interrupted sync continues where it
stopped and a second sync uploads nothing twice.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .offline import RECORD, STEPS, read_metrics, read_record, write_record


def find_offline_dirs(path: str | Path) -> list[Path]:
    path = Path(path)
    if (path / RECORD).is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass an offline directory (runs/<run_id>/offline) "
                          f"or a directory that contains some (e.g. runs)")
    return sorted(p.parent for p in path.rglob(f"offline/{RECORD}"))


def _known_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _parent_run(client, directory: Path, record: dict, echo):
    """The server's run for ``record``'s parent, or None when it has none (or it is lost)."""
    parent_id = record.get("parent_run_id")
    if not parent_id:
        return None
    parent = _known_run(client, parent_id)
    if parent is not None:
        return parent
    # Created offline too: its offline directory stands next to this one (runs/<id>/offline).
    parent_dir = directory.parent.parent / parent_id / "offline"
    if (parent_dir / RECORD).is_file():
        target = read_record(parent_dir).get("target_run_id")
        if not target:
            raise ConfigError(f"the parent run of {directory} is waiting in {parent_dir}; sync it first "
                              f"(`kd-mlflow sync {directory.parent.parent}` syncs parents before children)")
        return client.get_run(target)
    echo(f"  warning: its parent run {parent_id} is unknown to this server and has no offline directory "
         f"here; it is created as a top-level run")
    return None


def _target_run(client, directory: Path, record: dict, echo) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    known = _known_run(client, record["run_id"])
    if known is not None:
        return known.info.run_id
    if record.get("target_run_id"):  # created by an earlier, interrupted sync
        return record["target_run_id"]
    tags = {"kd_mlflow.synced_from": record["run_id"]}
    parent = _parent_run(client, directory, record, echo)
    if parent is not None:
        experiment_id = parent.info.experiment_id
        name = client.get_experiment(experiment_id).name
        tags[MLFLOW_PARENT_RUN_ID] = parent.info.run_id
    else:
        name = record.get("experiment_name") or "kd-mlflow"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=record.get("run_name"), start_time=record.get("start_time"),
                            tags=tags)
    if record.get("created_offline"):
        echo(f"  run {record['run_id']} was created offline: logging into new run {run.info.run_id} "
             + (f"nested under run {parent.info.run_id}" if parent is not None else f"of experiment {name!r}"))
    else:
        echo(f"  run {record['run_id']} is unknown to this server: logging into new run {run.info.run_id} "
             f"of experiment {name!r}")
    return run.info.run_id


def _log_model(run_id: str, directory: Path, entry: dict):
    import mlflow
    import torch

    from ..checkpoint import load_model_checkpoint
    from ..models import create_model
    from .tracker import MlflowTracker

    checkpoint = directory / "files" / entry["checkpoint"]
    state, meta = load_model_checkpoint(checkpoint)
    model = create_model(meta["arch"], meta["num_classes"], meta["in_channels"])
    model.load_state_dict(state)
    example = torch.load(directory / "files" / entry["example"], map_location="cpu", weights_only=True)
    raw_example = torch.load(directory / "files" / entry["raw_example"], map_location="cpu",
                             weights_only=True).numpy() if entry.get("raw_example") else None
    with mlflow.start_run(run_id=run_id):
        tracker = MlflowTracker(run_id)
        uri, version = tracker._log_model(model.eval(), example, entry.get("registered_name"), checkpoint,
                                          entry.get("name", "model"), entry.get("card"), raw_example)
        tracker.metrics.close()
    return uri, version


def sync_dir(directory: Path, echo=print) -> str | None:
    """Upload one offline directory; -> the run id it went to (None if already synced)."""
    import mlflow
    from mlflow.entities import Param, RunTag

    record = read_record(directory)
    done = record.setdefault("done", [])
    if all(step in done for step in STEPS):
        echo(f"{directory}: already synced to run {record.get('target_run_id', record['run_id'])}; nothing to do")
        return None
    client = mlflow.MlflowClient()
    run_id = _target_run(client, directory, record, echo)

    def save() -> None:
        write_record(record, directory)

    def finish(step: str) -> None:
        done.append(step)
        save()

    if record.get("target_run_id") != run_id:
        record["target_run_id"] = run_id
        save()
    if "params" not in done:
        logged = client.get_run(run_id).data.params
        new = {k: v for k, v in record["params"].items() if k not in logged}
        clash = {k: (logged[k], v) for k, v in record["params"].items() if k in logged and logged[k] != v}
        if clash:
            echo(f"  warning: params already logged with other values are kept: {clash}")
        if new:
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in new.items()], synchronous=True)
        finish("params")
    if "tags" not in done:
        if record["tags"]:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()], synchronous=True)
        finish("tags")
    if "datasets" not in done:
        if record.get("datasets"):  # records written before datasets were logged have none
            from .tracker import dataset_inputs

            client.log_inputs(run_id, dataset_inputs(record["datasets"]))
        finish("datasets")
    if "metrics" not in done:
        metrics = read_metrics(directory)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)
        echo(f"  {len(metrics)} metric values")
        finish("metrics")
    if "artifacts" not in done:
        for artifact in record["artifacts"]:
            parent = str(Path(artifact).parent)
            client.log_artifact(run_id, str(directory / "files" / artifact), None if parent == "." else parent)
        echo(f"  {len(record['artifacts'])} artifacts")
        finish("artifacts")
    if "models" not in done:
        for entry in record["models"]:
            uri, version = _log_model(run_id, directory, entry)
            echo(f"  model {uri}" + (f" registered as {entry['registered_name']} v{version}" if version else ""))
        finish("models")
    if "registrations" not in done:
        from .registry import register_version

        for entry in record["registrations"]:
            version = register_version(client, entry["model_uri"], entry["name"], entry.get("card"),
                                       run_id if entry.get("own_run") else None)
            echo(f"  registered {entry['model_uri']} as {entry['name']} v{version}")
        finish("registrations")
    if "status" not in done:
        if record.get("status"):
            client.set_terminated(run_id, record["status"], end_time=record.get("end_time"))
            echo(f"  status {record['status']}")
        finish("status")
    return run_id


def _parents_first(directories: list[Path]) -> list[Path]:
    """``directories`` reordered so that a run's parent, when among them, comes before it."""
    run_ids, parent_of = {}, {}
    for directory in directories:
        try:
            record = read_record(directory)
        except ConfigError:
            continue  # sync_dir says what is wrong with it, in turn
        run_ids[directory] = record["run_id"]
        parent_of[record["run_id"]] = record.get("parent_run_id")

    def depth(directory: Path) -> int:
        run_id, ancestors = run_ids.get(directory), set()
        while parent_of.get(run_id) in parent_of and run_id not in ancestors:
            ancestors.add(run_id)
            run_id = parent_of[run_id]
        return len(ancestors)

    return sorted(directories, key=depth)


def sync(path: str | Path, echo=print) -> list[str]:
    from .health import check_tracking_server, shown_tracking_uri

    directories = _parents_first(find_offline_dirs(path))
    if not directories:
        raise ConfigError(f"no offline run directories (offline/run.json) under {path}; nothing to sync")
    check_tracking_server()
    echo(f"syncing {len(directories)} offline run(s) to {shown_tracking_uri()}")
    synced = []
    for directory in directories:
        echo(f"{directory}:")
        run_id = sync_dir(directory, echo)
        if run_id:
            synced.append(run_id)
    return synced
