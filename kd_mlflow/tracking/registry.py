"""The model registry as kd-mlflow sees it: registered students with the mode, teacher
and test accuracy of the run behind each version, the ``champion`` alias on the best
version of each model, and pulling one version to a local directory.

Everything is read from MLflow (the version's run: its tags and metrics), so these
functions work on any tracking server, whoever registered the models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .health import shown_registry_uri

CHAMPION = "champion"


def _client(client=None):
    """``client``, or for a command (which passes none) a new one once the registry's server
    has answered: an unreachable server or bad credentials fail in one line, at once."""
    if client is not None:
        return client
    import mlflow

    from .health import check_tracking_server

    check_tracking_server(mlflow.get_registry_uri())
    return mlflow.MlflowClient()


def _quote(name: str) -> str:
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def versions_of(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name={_quote(name)}"), key=lambda v: int(v.version))


def _run_or_none(client, run_id: str | None, cache: dict | None = None):
    if not run_id:
        return None
    if cache is not None and run_id in cache:
        return cache[run_id]
    try:
        run = client.get_run(run_id)
    except Exception:  # the run was deleted, or lives in a store we cannot read
        run = None
    if cache is not None:
        cache[run_id] = run
    return run


def version_test_acc(client, version, cache: dict | None = None) -> float | None:
    """The ``test_acc`` metric of the run that logged the version's model."""
    run = _run_or_none(client, version.run_id, cache)
    value = run.data.metrics.get("test_acc") if run is not None else None
    return None if value is None or math.isnan(value) else float(value)


def register_version(client, model_uri: str, name: str, card: dict | None = None, run_id: str | None = None) -> int:
    """Register a logged model under ``name``, describe the version (``card``: see
    serving.model_card) and re-elect the champion; -> the new version. ``run_id``: the run
    the version belongs to when it is not the run that logged the model (a strategy's
    parent, which selected one of its stages' models): its page lists the version, and its
    test_acc is the version's."""
    import mlflow

    if run_id is None:
        version = int(mlflow.register_model(model_uri, name).version)
    else:
        from mlflow.exceptions import MlflowException

        client = _client(client)
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        rest = model_uri.removeprefix("models:/")  # a logged model's id (models:/<model_id>), not a name/version
        model_id = rest if rest != model_uri and "/" not in rest and "@" not in rest else None
        version = int(client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id).version)
    describe_version(client, name, version, card)
    update_champion(client, name)
    return version


def describe_version(client, name: str, version: int, card: dict | None) -> None:
    """The version's description (what it is, its test_acc, its run, how to load it) and
    tags (mode, dataset, student, teacher, test_acc), from the student's model card."""
    if not card:
        return
    client = _client(client)
    uri = f"models:/{name}/{version}"
    client.update_model_version(name, str(version), description=card["description"].replace("{model_uri}", uri))
    for key, value in card["tags"].items():
        client.set_model_version_tag(name, str(version), key, str(value))


def update_champion(client, name: str, alias: str = CHAMPION) -> int | None:
    """Point ``alias`` (default ``champion``) of registered model ``name`` at its version
    with the highest ``test_acc``; move it only when a strictly better version exists
    (on a tie the current holder stays, and among new candidates the oldest wins).
    Versions whose run has no ``test_acc`` are never chosen. Returns the champion's
    version, or None when no version has a test_acc.

    ``client`` may be None (an MlflowClient for the current tracking/registry URI).
    Call it after every registration (it flushes this process's asynchronous metric
    logging first, so a test_acc logged just before the registration is seen)."""
    import mlflow

    client = _client(client)
    try:
        mlflow.flush_async_logging()
    except Exception:
        pass
    cache: dict = {}
    scored = [(acc, int(v.version)) for v in versions_of(client, name)
              if (acc := version_test_acc(client, v, cache)) is not None]
    if not scored:
        return None
    best_acc, best_version = max(scored, key=lambda s: (s[0], -s[1]))
    current = current_alias_version(client, name, alias)
    if current is not None:
        current_acc = dict((v, a) for a, v in scored).get(int(current.version))
        if current_acc is not None and current_acc >= best_acc:
            return int(current.version)
    client.set_registered_model_alias(name, alias, str(best_version))
    return best_version


def current_alias_version(client, name: str, alias: str = CHAMPION):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # no such alias (MLflow raises RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER_VALUE)
        return None


# ----------------------------------------------------------------------- listing
def registered_models(client=None, name_contains: str = "") -> list:
    client = _client(client)
    filter_string = f"name LIKE {_quote('%' + name_contains + '%')}" if name_contains else None
    models, token = [], None
    while True:
        page = client.search_registered_models(filter_string=filter_string, max_results=100, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            return sorted(models, key=lambda m: m.name)


def model_table(client=None, name_contains: str = "", all_versions: bool = True):
    """-> pandas DataFrame, one row per registered version: name, version, aliases, mode,
    teacher, student, dataset, test_acc, run_id (mode and teacher from the version's run;
    a stage of a multi-stage mode shows that mode, e.g. allkd)."""
    import pandas as pd

    client = _client(client)
    rows, cache = [], {}
    for model in registered_models(client, name_contains):
        aliases: dict[str, list] = {}
        for alias, version in (getattr(model, "aliases", None) or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = versions_of(client, model.name)
        if not all_versions and versions:
            champion = [v for v in versions if CHAMPION in aliases.get(str(v.version), [])]
            versions = champion or versions[-1:]
        for v in reversed(versions):
            run = _run_or_none(client, v.run_id, cache)
            tags = run.data.tags if run is not None else {}
            acc = version_test_acc(client, v, cache)
            rows.append({"name": model.name, "version": int(v.version),
                         "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                         "mode": tags.get("parent_mode") or tags.get("mode", ""), "teacher": tags.get("teacher", ""),
                         "student": tags.get("student", ""), "dataset": tags.get("dataset", ""),
                         "test_acc": acc if acc is not None else math.nan, "run_id": v.run_id or ""})
    return pd.DataFrame(rows, columns=["name", "version", "aliases", "mode", "teacher", "student", "dataset",
                                       "test_acc", "run_id"])


def format_table(df) -> str:
    """Aligned plain-text columns for the terminal."""
    if not len(df):
        return ""
    shown = df.copy()
    shown["test_acc"] = [("" if math.isnan(a) else f"{a:.2f}") for a in shown["test_acc"]]
    cells = [list(shown.columns)] + [[str(v) for v in row] for row in shown.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# ------------------------------------------------------------------------ pulling
@dataclass
class ModelRef:
    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{self.version}"


def parse_model_spec(spec: str) -> ModelRef:
    """``name``, ``name@alias`` or ``name/version`` (a ``models:/`` prefix is allowed)."""
    spec = spec.strip()
    if spec.startswith("models:/"):
        spec = spec[len("models:/"):]
    if not spec:
        raise ConfigError("no model given; pass NAME, NAME@ALIAS or NAME/VERSION (see `kd-mlflow models list`)")
    if "@" in spec:
        name, alias = spec.rsplit("@", 1)
        if not name or not alias:
            raise ConfigError(f"{spec!r} is not NAME@ALIAS; e.g. fashion_mnist-resnet8-kd@champion")
        return ModelRef(name, alias=alias)
    match = re.fullmatch(r"(.+)/(\d+)", spec)
    if match:
        return ModelRef(match.group(1), version=match.group(2))
    if "/" in spec:
        raise ConfigError(f"{spec!r}: the part after '/' must be a version number; e.g. {spec.split('/')[0]}/1")
    return ModelRef(spec)


def resolve(client, ref: ModelRef):
    """-> the ModelVersion ``ref`` names; a bare name means its champion, else its latest version."""
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        if ref.version:
            return client.get_model_version(ref.name, ref.version)
        champion = current_alias_version(client, ref.name)
        if champion is not None:
            return champion
        versions = versions_of(client, ref.name)
    except Exception as exc:
        raise ConfigError(f"{ref.uri if (ref.alias or ref.version) else ref.name} is not in the registry at "
                          f"{shown_registry_uri()} ({_first_line(exc)}); see `kd-mlflow models list`") from exc
    if not versions:
        raise ConfigError(f"registered model {ref.name!r} has no versions at {shown_registry_uri()}; "
                          f"see `kd-mlflow models list`")
    return versions[-1]


def pull(spec: str, out_dir, client=None):
    """Download the model version named by ``spec`` into ``out_dir`` (which must be new or
    empty) -> (local path, ModelVersion). ``mlflow.pytorch.load_model(path)`` loads it."""
    import mlflow

    client = _client(client)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; pass -o with a new or empty directory")
    version = resolve(client, parse_model_spec(spec))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc.strerror}; pass -o with a writable directory") from exc
    uri = f"models:/{version.name}/{version.version}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(out))
    return Path(local), version




def _first_line(exc: Exception) -> str:
    from .health import redact

    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)[:160]
