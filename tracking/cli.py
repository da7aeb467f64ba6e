"""The ``tracking`` command line: a thin shell over the library.

This is the only place that turns errors into exit codes: a :class:`TrackingError` prints one
line on stderr and exits 1, a usage error exits 2, and ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tracking.config import ENV_VARS, TrackingConfig
from tracking.errors import TrackingError
from tracking.stack import DEFAULT_MLFLOW_PORT, DEFAULT_S3_PORT, SEAWEEDFS_PORT_COUNT, LocalStack


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TrackingError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            message = " ".join(str(exc).split())  # one line, whatever the message holds
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Log PyTorch checkpoints to MLflow on S3, and run a local stack to try it."""


@main.group()
def stack() -> None:
    """A local SeaweedFS (S3) + MLflow server, with state in the data folder."""


_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"State folder (default: ${ENV_VARS['data_dir']} or .tracking).",
)


def _config(data_dir: Path | None) -> TrackingConfig:
    return TrackingConfig.from_env(data_dir=data_dir)


@stack.command()
@_data_dir_option
@click.option(
    "--s3-port",
    type=click.IntRange(1, 65536 - SEAWEEDFS_PORT_COUNT),
    default=DEFAULT_S3_PORT,
    show_default=True,
    help=f"S3 port; SeaweedFS uses the {SEAWEEDFS_PORT_COUNT} ports from here on.",
)
@click.option(
    "--mlflow-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_MLFLOW_PORT,
    show_default=True,
    help="MLflow server port (UI and REST API).",
)
@click.option(
    "--backend-store-uri",
    default=None,
    metavar="URI",
    help="MLflow backend store, e.g. postgresql+psycopg2://user@host/db (default: sqlite in the data folder).",
)
@click.option(
    "--serve-artifacts/--no-serve-artifacts",
    default=False,
    show_default=True,
    help="Proxy artifacts through the MLflow server instead of clients writing to S3 directly.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=90.0, show_default=True, help="Seconds to wait.")
def up(
    data_dir: Path | None,
    s3_port: int,
    mlflow_port: int,
    backend_store_uri: str | None,
    serve_artifacts: bool,
    timeout: float,
) -> None:
    """Start SeaweedFS and the MLflow server (does nothing if they already run)."""
    config = _config(data_dir)
    try:
        local = LocalStack(
            config,
            config.data_dir,
            s3_port=s3_port,
            mlflow_port=mlflow_port,
            backend_store_uri=backend_store_uri,
            serve_artifacts=serve_artifacts,
            startup_timeout=timeout,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    started = local.up()
    pids = {s.name: s.pid for s in local.status().services}
    for name, pid in pids.items():
        verb = "started" if name in started else "already running"
        click.echo(f"{name}: {verb} (pid {pid}, log {local.log_path(name)})")
    click.echo(f"MLflow UI:   {local.tracking_uri}")
    click.echo(f"S3 endpoint: {local.s3_endpoint_url}  bucket: {local.bucket}")
    mode = "proxied by the MLflow server" if local.serve_artifacts else "written to S3 by clients"
    click.echo(f"artifacts:   {local.artifact_root} ({mode})")
    click.echo(f"\n# set these (or: source {local.env_file})")
    for key, value in local.env().items():
        if key == "AWS_SECRET_ACCESS_KEY" and not local.uses_local_credentials:
            # The user's own secret: it is in their environment already and never printed.
            click.echo(f"# {key} is taken from your environment")
            continue
        click.echo(f"export {key}={value}")
    if local.uses_local_credentials:
        click.echo("# local default S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY to choose your own")


@stack.command()
@_data_dir_option
def down(data_dir: Path | None) -> None:
    """Stop the processes `up` started; the data folder stays."""
    local = LocalStack.from_data_dir(_config(data_dir))
    stopped = local.down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack.command()
@_data_dir_option
def status(data_dir: Path | None) -> None:
    """Show each service's pid, state and URL, and the data folder's size."""
    from rich.console import Console
    from rich.table import Table

    local = LocalStack.from_data_dir(_config(data_dir))
    report = local.status()
    table = Table(title=f"local stack in {report.data_dir}")
    for column in ("service", "pid", "state", "url"):
        table.add_column(column, no_wrap=True)
    table.add_column("log", overflow="fold")
    for service in report.services:
        if service.alive:
            state = "[green]running[/]"
        else:
            state = "[red]dead[/] (stale pid file)" if service.pid is not None else "stopped"
        pid = str(service.pid) if service.pid is not None else "-"
        table.add_row(service.name, pid, state, service.url, str(service.log))
    console = Console()
    console.print(table)
    console.print(f"backend store: {report.backend_store_uri}")
    console.print(f"data folder: {report.data_dir} ({_human_size(report.data_bytes)})")


def _human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# ------------------------------------------------------------------ runs


def _check_source(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from tracking.uri import parse_source

    try:
        parse_source(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


_source_argument = click.argument("source", metavar="RUN", callback=_check_source)


@main.command()
@_source_argument
def checkpoints(source: str) -> None:
    """List a run's committed checkpoints. RUN is a run ID, runs:/<id> or models:/<name>@<alias>."""
    from rich.console import Console
    from rich.table import Table

    from tracking.loader import find_checkpoint, list_checkpoints

    manifests = list_checkpoints(source)
    if not manifests:
        click.echo(f"{source}: no committed checkpoints")
        return
    latest = find_checkpoint(source, "latest")[1].epoch
    best = _best_epoch(source)
    table = Table(title=f"checkpoints of {source}")
    for column in ("epoch", "step", "metrics", "size", "created", ""):
        table.add_column(column)
    for manifest in manifests:
        marks = [m for m, e in (("latest", latest), ("best", best)) if e == manifest.epoch]
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(manifest.metrics.items()))
        size = sum(f.size for f in manifest.files.values())
        step = "-" if manifest.step is None else str(manifest.step)
        table.add_row(str(manifest.epoch), step, metrics, _human_size(size), manifest.created_at, " ".join(marks))
    Console().print(table)


def _best_epoch(source: str) -> int | None:
    from tracking.errors import NotFoundError
    from tracking.loader import find_checkpoint

    try:
        return find_checkpoint(source, "best")[1].epoch
    except NotFoundError:
        return None  # no monitored metric: nothing is "best"


@main.command()
@_source_argument
@click.option("--checkpoint", default="latest", show_default=True, help="latest, best or an epoch number.")
def show(source: str, checkpoint: str) -> None:
    """Print a checkpoint's manifest as JSON. RUN is a run ID, runs:/<id> or models:/<name>@<alias>."""
    from tracking.loader import find_checkpoint

    folder, manifest = find_checkpoint(source, checkpoint)
    click.echo(f"# {folder}/manifest.json", err=True)
    click.echo(manifest.to_json().decode())


@main.command()
@_source_argument
def verify(source: str) -> None:
    """Check a run's stored files against their manifests' size and sha256. RUN: a run ID or URI."""
    from tracking.errors import IntegrityError
    from tracking.loader import verify as verify_run

    report = verify_run(source)
    for path, problem in report.items():
        click.echo(f"{'ok ' if problem is None else 'BAD'} {path}")
    bad = [path for path, problem in report.items() if problem is not None]
    if bad:
        raise IntegrityError(f"{len(bad)} of {len(report)} files failed: {report[bad[0]]}")
    click.echo(f"{len(report)} files intact" if report else f"{source}: nothing to verify")
