"""``kd-mlflow``: the command line. Commands and options are generated from the mode
registry and the Config dataclass, the same sources as the MLproject, so the three
cannot drift apart."""

from __future__ import annotations

import os
import functools
import sys

import click

from .config import BACKEND_ENV, DEFAULT_ARTIFACTS, DEFAULT_BACKEND_STORE_URI, Config, ConfigError
from .tracking import shown_tracking_uri
from .modes import DISTILLATION_MODES, MODES

_TYPES = {"int": int, "float": float, "str": str, "bool": click.BOOL}


def _option(name: str, mode: str | None = None, default=None):
    """A click option for a parameter (common field or a mode's own), named and documented
    as everywhere. Choices are checked by Config.validate, so every bad value gets the same
    one-line "problem; fix" error whether it came from the CLI or MLproject."""
    p = Config.parameter(name, mode)
    help_text = p.help + (f" One of: {', '.join(p.choices)}." if p.choices else "")
    decls = ["--" + name.replace("_", "-"), "--" + name] if "_" in name else ["--" + name]
    return click.option(*decls, name, type=_TYPES[p.type], default=p.default if default is None else default,
                        show_default=True, help=help_text)


def config_options(mode_name: str):
    """click options for every parameter the mode takes, with the mode's default."""

    def decorate(fn):
        for name in reversed(MODES[mode_name].fields):
            fn = _option(name, mode_name)(fn)
        return fn

    return decorate


class _ModeCommand(click.Command):
    """A mode's command: an option that belongs to other modes (logit_standardization on
    oh, say) is one line saying which modes take it, not click's usage screen."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            from .modes import modes_taking

            name = exc.option_name.lstrip("-").split("=")[0].replace("-", "_")
            if name in dict(MODES[self.name].renamed):
                raise ConfigError(MODES[self.name].unknown_parameter(name)) from None
            takers = modes_taking(name)
            if not takers:
                raise
            raise ConfigError(f"mode {self.name} has no parameter {name}; the modes that take it: "
                              f"{', '.join(takers)}") from None


def _is_rank0() -> bool:
    """False in torchrun's processes other than rank 0, which run in silence: every rank
    meets the same errors, and rank 0 reports them once."""
    return os.environ.get("RANK", "0") == "0"


def _fail(exc: Exception) -> None:
    """``exc`` as one line (through redact: MLflow's errors quote the tracking URI, password
    included), then exit 2."""
    if _is_rank0():
        from .tracking import redact

        text = str(exc).strip()
        if _from_mlflow_client(exc):  # MLflow's texts can run on with a response body: its first line
            text = f"{type(exc).__name__}: {(text.splitlines() or [''])[0]}"
        click.echo(f"error: {redact(text)}", err=True)
        from .tracking import record_failure

        record_failure(text)  # under `mlflow run`: the reason on the run the launcher made
    else:
        import time

        time.sleep(1.0)  # let rank 0 say it and fail first: torchrun stops the others then
    sys.exit(2)


def _cli_args(cfg: Config) -> list[str]:
    """``kd-mlflow`` arguments that reproduce ``cfg`` exactly: what torchrun's processes
    are started with, so they cannot disagree with the launcher about any parameter."""
    def text(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return repr(value) if isinstance(value, float) else str(value)  # repr: floats round-trip exactly

    mode = MODES[cfg.mode]
    args = ["teacher"] if mode.kind == "teacher" else ["train", cfg.mode]
    for name in mode.fields:
        args += [f"--{name}", text(getattr(cfg, name))]
    return args


def run_config(cfg: Config) -> None:
    from .distributed import launch, launched_by_torchrun

    if cfg.nproc_per_node > 1 and not launched_by_torchrun():
        sys.exit(launch(cfg.nproc_per_node, _cli_args(cfg)))
    from .distributed import Terminated
    from .runner import run
    from .trainer import NonFiniteLoss

    try:
        result = run(cfg)
    except ConfigError as exc:
        _fail(exc)
    except NonFiniteLoss as exc:
        if _is_rank0():
            click.echo(f"error: {exc}; the run is marked FAILED", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        signal_name = "SIGTERM" if isinstance(exc, Terminated) else "interrupt"
        if _is_rank0():
            click.echo(f"stopped by {signal_name}: the run is marked KILLED; continue it from its last epoch "
                       f"checkpoint with --resume auto (or the run id)", err=True)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    if result is None or not _is_rank0():
        return
    _exit_if_offline()
    click.echo(f"\nmode {cfg.mode}: {cfg.network} on {cfg.dataset}")
    click.echo(f"  test_acc      {result.test_acc:.2f}%  (best val_acc {result.best_val_acc:.2f}% "
               f"at epoch {result.best_epoch + 1} of {cfg.epochs})")
    click.echo(f"  run id        {result.run_id}")
    if result.registered_model:
        click.echo(f"  registered    models:/{result.registered_model}/{result.version}")
    elif not cfg.registers:
        click.echo(f"  registered    no: a smoke run ({cfg.smoke}); name it with --registered-model to register it")
    click.echo(f"  tracking URI  {shown_tracking_uri()}")
    click.echo(f"  open the UI:  {_ui_hint()}")


EXIT_OFFLINE = 75  # EX_TEMPFAIL: trained, but the tracking server has not got everything yet


def _exit_if_offline() -> None:
    from .tracking.offline import OFFLINE_DIRS

    if OFFLINE_DIRS:
        click.echo(f"warning: the tracking server never came back; the training finished and what the server "
                   f"missed is in {', '.join(map(str, OFFLINE_DIRS))}. Upload it with `kd-mlflow sync runs` "
                   f"once the server is back.", err=True)
        sys.exit(EXIT_OFFLINE)


def _ui_hint() -> str:
    uri = shown_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"browse {uri}"
    return f"mlflow ui --backend-store-uri {uri}  (then browse http://127.0.0.1:5000)"


def _from_mlflow_client(exc: Exception) -> bool:
    """An error of MLflow's client or of the HTTP stack under it (server down, refused, ...)."""
    return type(exc).__module__.split(".")[0] in ("mlflow", "requests", "urllib3")


class _NoSecretsGroup(click.Group):
    """No password in anything a command prints: MLflow's "View run at <URL>" lines are
    turned off when MLFLOW_TRACKING_URI holds credentials (we print the URI redacted), and an
    error no command caught is shown through redact: MLflow's (and our ConfigError) as one
    line, any other with its traceback."""

    def invoke(self, ctx):
        import traceback

        from .tracking import redact

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if redact(uri) != uri:
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, ConfigError) or _from_mlflow_client(exc):
                _fail(exc)
            click.echo(redact(traceback.format_exc()).rstrip(), err=True)
            sys.exit(1)


@click.group(cls=_NoSecretsGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Knowledge distillation for image classification, tracked in MLflow."""


@main.group()
def train() -> None:
    """Train a student with one distillation mode."""


def _make_train_command(mode_name: str):
    mode = MODES[mode_name]

    @train.command(name=mode_name, cls=_ModeCommand, help=mode.summary, short_help=mode.summary)
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


@main.command(name="teacher", cls=_ModeCommand, help=MODES["teacher"].summary)
@config_options("teacher")
def teacher_command(**kwargs):
    try:
        cfg = Config.for_mode("teacher", **kwargs).validate()
    except ConfigError as exc:
        _fail(exc)
    run_config(cfg)


@main.command(name="modes")
@click.option("--kind", type=click.Choice(["distiller", "strategy", "teacher"]),
              help="Only the names of this kind, comma-separated (what a Makefile or script reads).")
@click.option("--markdown", is_flag=True, help="The README's modes table.")
def modes_command(kind: str | None, markdown: bool) -> None:
    """The modes this installation has: the built-in methods and other packages'."""
    if kind:
        click.echo(",".join(name for name, m in MODES.items() if m.kind == kind))
        return
    if markdown:
        click.echo(modes_markdown())
        return
    width = max(len(n) for n in MODES)
    for name, m in MODES.items():
        origin = "" if m.origin == "kd_mlflow" else f"  [{m.origin}]"
        click.echo(f"{name:<{width}}  {m.kind:<9}  {m.summary}{origin}")


def modes_markdown() -> str:
    """The built-in modes as a Markdown table: name, kind, summary, own parameters with defaults."""
    def default(p):
        if isinstance(p.default, bool):
            return f"`{str(p.default).lower()}`"
        return f"`{p.default}`" if p.default != "" else "(none)"

    lines = ["| mode | kind | what it does | its own parameters (defaults) |", "|---|---|---|---|"]
    for name, m in MODES.items():
        if m.origin != "kd_mlflow":
            continue
        own = ", ".join(f"`{p.name}` {default(p)}" for p in m.params) or "common ones only"
        lines.append(f"| [`{name}`](kd_mlflow/methods/{name}/) | {m.kind} | {m.summary} | {own} |")
    return "\n".join(lines)


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



# ------------------------------------------------- compare, benchmark, models
@main.command(name="compare")
@click.option("--experiment", default="", show_default=True,
              help="Experiment to compare (name or id); empty under `mlflow run` = the run's own experiment.")
@click.option("--output-dir", default="", help="Also write summary.csv, runs.csv, summary.md and the figures "
                                               "(PNG) into this folder.")
@click.option("--runs-csv", default="", help="Recompute the tables of a runs.csv that --output-dir wrote (e.g. "
                                             "docs/benchmark/fashion_mnist-runs.csv), without MLflow and without "
                                             "logging a run.")
def compare_command(experiment: str, output_dir: str, runs_csv: str) -> None:
    """Compare the modes of an experiment: a table per mode (seeds, mean ± std test_acc,
    best val_acc, wall time, gain over nokd with a 95% CI, paired on matched seeds) and
    figures, logged as a run of its own (tag mode=compare). Failed, unfinished and
    mismatched runs are listed, never averaged."""
    from pathlib import Path

    from .analysis.compare import compare_runs_csv, run_compare
    from .analysis.report import write_comparison

    try:
        if runs_csv:
            if experiment:
                raise ConfigError("pass --experiment or --runs-csv, not both")
            comparison = compare_runs_csv(runs_csv)
            if output_dir:
                write_comparison(comparison, Path(output_dir), figures=True)
            click.echo(comparison.markdown)
            return
        run_compare(experiment, echo=click.echo, output_dir=output_dir)
    except ConfigError as exc:
        _fail(exc)


def _common_run_options(fn, skip=(), seeds=True):
    """The benchmark's shared Config options and --seeds (a benchmark and a sweep take both)."""
    from .benchmark import BENCHMARK_FIELDS

    for name in reversed(BENCHMARK_FIELDS):
        if name not in skip:
            fn = _option(name)(fn)
    if not seeds:
        return fn
    fn = click.option("--first-seed", "--first_seed", "first_seed", type=int, default=0, show_default=True,
                      help="The first seed: seeds first..first+N-1 (confirm on fresh seeds, e.g. --first-seed 5 "
                           "--seeds 5, that no selection saw).")(fn)
    return click.option("--seeds", type=int, default=3, show_default=True,
                        help="Number of seeds: --first-seed..--first-seed+N-1.")(fn)


def _benchmark_options(fn):
    fn = _common_run_options(fn)
    fn = click.option("--register", type=int, default=0, show_default=True,
                      help="1 = register every student (and move the champion alias); 0 = log models only.")(fn)
    fn = click.option("--modes", default="all", show_default=True,
                      help=f"Comma-separated modes, or all ({', '.join(DISTILLATION_MODES)}).")(fn)
    return _execution_options(fn)


def _execution_options(fn):
    """--jobs, --ray-address, --cpus-per-cell, --gpus-per-cell, --storage (execution.OPTIONS)."""
    from .execution import OPTIONS

    for name, (kind, default, text) in reversed(OPTIONS.items()):
        dashed = name.replace("_", "-")
        names = (f"--{dashed}", f"--{name}") if dashed != name else (f"--{name}",)
        fn = click.option(*names, name, type=kind, default=default, show_default=True, help=text)(fn)
    return fn


def _run_job(what: str, job):
    """``job()`` of a multi-run command -> its result; bad input is one line (exit 2), and
    SIGTERM or Ctrl-C says what happened to the runs and exits 143 or 130."""
    try:
        return job()
    except ConfigError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        from .distributed import Terminated

        click.echo(f"stopped by {'SIGTERM' if isinstance(exc, Terminated) else 'interrupt'}: the {what}'s run and "
                   f"its cells in training are marked KILLED; the same command continues it (finished cells are "
                   f"skipped, stopped ones resume from their last epoch)", err=True)
        sys.exit(143 if isinstance(exc, Terminated) else 130)


def _execution(values: dict):
    """The execution.Options in a command's keyword arguments (taken out of them)."""
    from .execution import OPTIONS, Options

    return Options(**{name: values.pop(name) for name in OPTIONS})


@main.command(name="benchmark")
@_benchmark_options
def benchmark_command(modes: str, seeds: int, register: int, **values) -> None:
    """Train modes x seeds as nested runs of one experiment, then compare them. Pairs
    already FINISHED with the same settings in the experiment are skipped (resume).
    Mode-specific parameters take each mode's defaults; multikd runs only with --ensemble."""
    from .benchmark import run_benchmark

    opts = _execution(values)
    result = _run_job("benchmark", lambda: run_benchmark(
        modes, seeds, register=bool(register), echo=click.echo, jobs=opts.jobs, ray_address=opts.ray_address,
        cpus_per_cell=opts.cpus_per_cell, gpus_per_cell=opts.gpus_per_cell, storage=opts.storage, **values))
    click.echo(f"  tracking URI  {shown_tracking_uri()}")
    click.echo(f"  open the UI:  {_ui_hint()}")
    if result.failed:
        sys.exit(1)


@main.command(name="sweep")
@click.argument("mode")
@click.option("--param", required=True, help="The mode's numeric parameter to vary, e.g. pkd_weight.")
@click.option("--values", "grid", required=True, help="Comma-separated values, e.g. 1,10,100.")
@click.option("--output", default="", help="Also write the per-value table to this CSV file.")
@functools.partial(_common_run_options, skip=("ensemble", "teachers", "temperatures", "alphas"))
@_execution_options
def sweep_command(mode: str, param: str, grid: str, output: str, seeds: int, **values) -> None:
    """Train MODE for every value of one of its parameters x seeds, as nested runs of one
    parent, and print a table per value (the value with the best mean val_acc is selected;
    test_acc is shown, never used to choose). Finished cells are skipped (resume)."""
    from .sweep import run_sweep

    opts = _execution(values)
    result = _run_job("sweep", lambda: run_sweep(mode, param, grid, seeds, output=output, echo=click.echo,
                                                 opts=opts, **values))
    click.echo(f"  tracking URI  {shown_tracking_uri()}")
    if result.failed:
        sys.exit(1)


@main.command(name="tune")
@click.argument("mode")
@click.option("--space", multiple=True, help="NAME=KIND:ARGS, once per searched parameter (or several in one "
              "value, separated by spaces); KIND: uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH, "
              "choice:A,B,C. E.g. --space temperature=loguniform:1:16 --space alpha=uniform:0.5:1.")
@click.option("--trials", type=int, default=8, show_default=True, help="Trials to run (the first: the defaults).")
@click.option("--metric", default="val_acc", show_default=True, help="What selects: val_acc or val_loss "
              "(never a test number).")
@click.option("--grace-epochs", "--grace_epochs", "grace_epochs", type=int, default=1, show_default=True,
              help="Epochs every trial trains before ASHA may stop it (then at 2x, 4x, ... below the last).")
@click.option("--search-seed", "--search_seed", "search_seed", type=int, default=0, show_default=True,
              help="Seed of Optuna's TPE sampler.")
@click.option("--search", default="tpe", show_default=True, help="tpe: Optuna's TPE with ASHA stopping; grid: "
              "every combination of the choice values, each trained to the end (kdparam's grid on Ray).")
@click.option("--seed", type=int, default=0, show_default=True, help="The trials' training seed (a selection "
              "seed: confirm the winner on other seeds).")
@functools.partial(_common_run_options, skip=("ensemble", "teachers", "temperatures", "alphas"), seeds=False)
@_execution_options
def tune_command(mode: str, space: tuple, trials: int, metric: str, grace_epochs: int, search_seed: int,
                 search: str, seed: int, **values) -> None:
    """Search MODE's parameters with Optuna (TPE) on Ray Tune, stopping weak trials early
    (ASHA on per-epoch val_acc). Every trial is a nested MLflow run; the tune run logs the
    best completed trial's parameters, val_acc and (for it alone) test_acc, and figures."""
    try:
        from .execution.tune import run_tune
    except ImportError as exc:
        _fail(ConfigError(f"tune needs Ray Tune and Optuna ({exc.name} is missing): pip install "
                          f"'ray[tune]==2.60.0' optuna==5.1.0"))
    specs = [part for value in space for part in value.split()]
    opts = _execution(values)
    _run_job("tune", lambda: run_tune(mode, specs, trials, metric, grace_epochs, search_seed, seed, search=search,
                                      opts=opts, echo=click.echo, **values))
    click.echo(f"  tracking URI  {shown_tracking_uri()}")


@main.command(name="sync")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def sync_command(directory: str) -> None:
    """Upload what the tracking server missed during an outage: DIRECTORY is a run's
    offline directory (runs/<run_id>/offline) or one that contains several (runs).
    Runs already synced are skipped, so syncing twice uploads nothing twice."""
    from .tracking.sync import sync

    try:
        synced = sync(directory, echo=click.echo)
    except ConfigError as exc:
        _fail(exc)
    click.echo(f"synced {len(synced)} run(s): {', '.join(synced) or '-'}")


@main.group(name="models")
def models_group() -> None:
    """Registered students: list them, pull one, move the champion alias."""


@models_group.command(name="list")
@click.option("--name", "name_contains", default="", help="Only models whose name contains this.")
@click.option("--latest", is_flag=True, help="One row per model: its champion, else its latest version.")
def models_list_command(name_contains: str, latest: bool) -> None:
    """Registered models with, per version, the mode, teacher and test_acc of its run."""
    from .tracking.registry import format_table, model_table

    table = model_table(name_contains=name_contains, all_versions=not latest)
    if not len(table):
        click.echo(f"no registered models{' matching ' + repr(name_contains) if name_contains else ''} "
                   f"at {shown_tracking_uri()}")
        return
    click.echo(format_table(table))


@models_group.command(name="pull")
@click.argument("spec")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="A new or empty directory for the model.")
def models_pull_command(spec: str, output: str) -> None:
    """Download a registered model: NAME (its champion, else its latest version),
    NAME@ALIAS or NAME/VERSION. Load it with mlflow.pytorch.load_model(OUTPUT)."""
    from .tracking.registry import pull, version_test_acc

    try:
        path, version = pull(spec, output)
    except ConfigError as exc:
        _fail(exc)
    from .tracking.queries import client

    acc = version_test_acc(client(), version)
    click.echo(f"pulled models:/{version.name}/{version.version}"
               f"{' (' + ', '.join(version.aliases) + ')' if getattr(version, 'aliases', None) else ''}"
               f"{f', test_acc {acc:.2f}%' if acc is not None else ''} -> {path}")
    click.echo(f"  load it:  mlflow.pytorch.load_model({str(path)!r})")


@models_group.command(name="champion")
@click.argument("name")
def models_champion_command(name: str) -> None:
    """Point NAME's `champion` alias at its version with the best test_acc (moved only
    when a strictly better version exists)."""
    from .tracking.registry import update_champion

    version = update_champion(None, name)
    if version is None:
        click.echo(f"error: {name} has no version whose run has a test_acc metric (or no such model)", err=True)
        sys.exit(2)
    click.echo(f"{name}@champion -> version {version}")


@main.group(name="runs")
def runs_group() -> None:
    """Tracked runs: find the ones left RUNNING by a process that is gone."""


@runs_group.command(name="clean")
@click.option("--experiment", default="", help="Only this experiment (name); default: every active one.")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Minutes since a run's last sign of life (heartbeat, start, metric) before it may be "
                   "called stale. A run whose kd-mlflow heartbeat is fresh is alive whatever this says.")
@click.option("--yes", is_flag=True, help="Mark the stale runs FAILED and delete the run directories nothing "
                                          "needs without asking (else: asked on a terminal, only listed otherwise).")
def runs_clean_command(experiment: str, older_than: float, yes: bool) -> None:
    """List the RUNNING runs whose process is gone (a crashed `mlflow run` launcher, e.g.
    conda missing; a killed training) with experiment, name, start and the reason, and mark
    them FAILED. Runs that are alive, recent, or not kd-mlflow's are never touched. Then
    report ./runs/ (each run directory's size and whether anything needs it) and delete the
    directories of FINISHED runs (their model is in MLflow); offline directories waiting
    for sync, RUNNING runs and resumable ones are kept."""
    from .tracking.cleanup import clean

    confirm = (lambda text: click.confirm(text, default=False)) if sys.stdin.isatty() else None
    try:
        clean(experiment, older_than, yes, echo=click.echo, confirm=confirm)
    except ConfigError as exc:
        _fail(exc)


# ------------------------------------------------------------ team tracking server
@main.command(name="server", context_settings={"ignore_unknown_options": True})
@click.option("--backend-store-uri", envvar=BACKEND_ENV, default=DEFAULT_BACKEND_STORE_URI, show_default=True,
              help=f"Backend store (SQLAlchemy URI); default from ${BACKEND_ENV}. A password is read "
                   "from ~/.pgpass or PGPASSWORD when the URI has none.")
@click.option("--artifacts-destination", default=DEFAULT_ARTIFACTS, show_default=True,
              help="Where the server stores artifacts it proxies: a directory, or s3://bucket/path (needs boto3).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. Loopback unless you pass another one explicitly (0.0.0.0 = every "
                   "interface: put authentication in front, see docs/operations.md).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="uvicorn worker processes.")
@click.argument("mlflow_args", nargs=-1, type=click.UNPROCESSED)
def server_command(backend_store_uri: str, artifacts_destination: str, host: str, port: int, workers: int,
                   mlflow_args: tuple) -> None:
    """Run a team tracking server: `mlflow server` on a PostgreSQL backend store with proxied
    artifacts, in the foreground. The driver, the database (reachable, credentials) and the
    port are checked first, each failing with one line. Anything after `--` goes to
    `mlflow server` as is (e.g. -- --allowed-hosts mlflow.example.com --app-name basic-auth)."""
    from .server import ServerError, serve

    try:
        code = serve(backend_store_uri, artifacts_destination, host, port, workers, mlflow_args, echo=click.echo)
    except ServerError as exc:
        _fail(exc)
    sys.exit(code)


def program() -> None:
    """The ``kd-mlflow`` program (console script, ``python -m kd_mlflow``, the MLproject's
    entry points). Once a command has returned it ends the process as ``sys.exit`` would,
    but without the interpreter's teardown of torch, MLflow and their ~5,000 modules: that
    teardown costs 1.3-1.6 s of CPU per process after a training (bench/startup.py) and
    serves nothing in a process about to end. What an exit must still do is done first,
    in the order Python does it: stop and wait for threads, run the atexit handlers
    (MLflow's and Ray's shutdowns, logging, multiprocessing, tempfile and weakref
    finalizers), flush stdout and stderr."""
    import atexit
    import threading

    try:
        main(prog_name="kd-mlflow")
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # as the interpreter does first: threading's own exit hooks
    # (which stop concurrent.futures' worker threads), then a join of non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader is gone
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    program()
