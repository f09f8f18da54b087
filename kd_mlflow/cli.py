"""``kd-mlflow``: the command line. Commands and options are generated from the mode
registry and the Config dataclass, the same sources as the MLproject, so the three
cannot drift apart."""

from __future__ import annotations

import dataclasses
import sys

import click

from .config import Config, ConfigError
from .modes import DISTILLATION_MODES, MODES

_TYPES = {"int": int, "float": float, "str": str}


def config_options(mode_name: str):
    """click options for every Config field the mode uses, with the dataclass default."""
    fields = {f.name: f for f in dataclasses.fields(Config)}

    def decorate(fn):
        for name in reversed(MODES[mode_name].fields):
            f = fields[name]
            # Choices are checked by Config.validate, so every bad value gets the same
            # one-line "problem; fix" error whether it came from the CLI or MLproject.
            choices = f.metadata.get("choices")
            help_text = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
            dashed = "--" + name.replace("_", "-")
            decls = [dashed, "--" + name] if "_" in name else [dashed]
            fn = click.option(*decls, name, type=_TYPES[f.type], default=Config.default_for(mode_name, name),
                              show_default=True, help=help_text)(fn)
        return fn

    return decorate


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def run_config(cfg: Config) -> None:
    from .runner import run

    try:
        result = run(cfg)
    except ConfigError as exc:
        _fail(exc)
    if result is None:
        return
    click.echo(f"\nmode {cfg.mode}: {cfg.network} on {cfg.dataset}")
    click.echo(f"  test_acc      {result.test_acc:.2f}%  (best val_acc {result.best_val_acc:.2f}% "
               f"at epoch {result.best_epoch + 1})")
    click.echo(f"  run id        {result.run_id}")
    if result.registered_model:
        click.echo(f"  registered    models:/{result.registered_model}/{result.version}")
    click.echo(f"  tracking URI  {_tracking_uri()}")
    click.echo(f"  open the UI:  {_ui_hint()}")


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _ui_hint() -> str:
    uri = _tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"browse {uri}"
    return f"mlflow ui --backend-store-uri {uri}  (then browse http://127.0.0.1:5000)"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Knowledge distillation for image classification, tracked in MLflow."""


@main.group()
def train() -> None:
    """Train a student with one distillation mode."""


def _make_train_command(mode_name: str):
    mode = MODES[mode_name]

    @train.command(name=mode_name, help=mode.summary, short_help=mode.summary)
    @config_options(mode_name)
    def command(**kwargs):
        try:
            cfg = Config.for_mode(mode_name, **kwargs).validate()
        except ConfigError as exc:
            _fail(exc)
        run_config(cfg)

    return command


for _name in DISTILLATION_MODES:
    _make_train_command(_name)


@main.command(name="teacher", help=MODES["teacher"].summary)
@config_options("teacher")
def teacher_command(**kwargs):
    try:
        cfg = Config.for_mode("teacher", **kwargs).validate()
    except ConfigError as exc:
        _fail(exc)
    run_config(cfg)


@main.command(name="mlproject")
@click.option("--check", is_flag=True, help="Exit 1 if MLproject differs from the registry instead of writing it.")
@click.option("--path", default="MLproject", show_default=True)
def mlproject_command(check: bool, path: str) -> None:
    """Write the MLproject file from the mode registry."""
    from pathlib import Path

    from .mlproject import render_mlproject

    text = render_mlproject()
    target = Path(path)
    if check:
        if not target.is_file() or target.read_text() != text:
            click.echo(f"{path} is out of date with the mode registry; run `kd-mlflow mlproject`", err=True)
            sys.exit(1)
        click.echo(f"{path} is up to date")
        return
    target.write_text(text)
    click.echo(f"wrote {path} ({len(MODES)} modes)")


if __name__ == "__main__":  # pragma: no cover
    main()
