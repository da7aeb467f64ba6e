"""``tracking stack up|down|status``: the local stack's commands, loaded by ``tracking.cli`` on demand.

Errors are not handled here: a :class:`~tracking.errors.TrackingError` reaches the ``tracking``
group, which prints it as one line and exits 1.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from tracking.config import TrackingConfig
from tracking.localstack import records
from tracking.localstack.services import HOST
from tracking.localstack.settings import ENV_VARS, StackSettings
from tracking.localstack.stack import (
    DEFAULT_MLFLOW_PORT,
    DEFAULT_S3_PORT,
    SEAWEEDFS_PORT_COUNT,
    LocalStack,
    StackError,
)
from tracking.localstack.supervisor import port_free
from tracking.output import Column, echo, human_size, table


@click.group()
def stack() -> None:
    """A local SeaweedFS (S3) + MLflow server, with state in the data folder.

    \b
    `up` records where the stack runs (in $XDG_STATE_HOME/tracking, default
    ~/.local/state/tracking), so every command finds it from any folder.

    \b
    Example:
      tracking stack up && source .tracking/stack.env
    """


_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"State folder (default: ${ENV_VARS['data_dir']} or .tracking; elsewhere: the stack `up` started).",
)


def _settings(data_dir: Path | None, *, stopping: bool = False) -> tuple[TrackingConfig, StackSettings]:
    config = TrackingConfig.from_env()
    settings = StackSettings.from_env(data_dir=records.locate(config, data_dir, stopping=stopping).data_dir)
    # --data-dir is checked by click; $TRACKING_DATA_DIR and the default .tracking are not, and a file there ended
    # every command in a traceback (NotADirectoryError on its pid files).
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise StackError(
            f"the data folder {settings.data_dir} is a file, not a folder: pass --data-dir (or set "
            f"{ENV_VARS['data_dir']} to) a folder, or move the file away"
        )
    return config, settings


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
    """Start SeaweedFS and the MLflow server (does nothing if they already run).

    \b
    Example:
      tracking stack up --backend-store-uri postgresql+psycopg2://postgres@127.0.0.1/test
    """
    config, settings = _settings(data_dir)
    found = LocalStack.from_data_dir(config, settings.data_dir, bucket=settings.bucket)
    if found.running():
        # `up` on a running stack is idempotent: options left out take its settings, not the defaults.
        def given(name: str) -> bool:
            return click.get_current_context().get_parameter_source(name) not in (ParameterSource.DEFAULT, None)

        s3_port = s3_port if given("s3_port") else found.s3_port
        mlflow_port = mlflow_port if given("mlflow_port") else found.mlflow_port
        backend_store_uri = backend_store_uri if given("backend_store_uri") else found.backend_store_uri
        serve_artifacts = serve_artifacts if given("serve_artifacts") else found.serve_artifacts
    try:
        local = LocalStack(
            config,
            settings.data_dir,
            s3_port=s3_port,
            mlflow_port=mlflow_port,
            backend_store_uri=backend_store_uri,
            serve_artifacts=serve_artifacts,
            startup_timeout=timeout,
            bucket=settings.bucket,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not local.running():
        _refuse_ports_of_another_stack(local)
    started = local.up()
    records.write(records.folder(), local.data_dir, local.s3_port, local.mlflow_port)
    pids = {s.name: s.pid for s in local.status().services}
    for name, pid in pids.items():
        verb = "started" if name in started else "already running"
        echo(f"{name}: {verb} (pid {pid}, log {local.log_path(name)})")
    echo(f"MLflow UI:   {local.tracking_uri}/#/experiments?workflowType=machine_learning")
    echo(f"S3 endpoint: {local.s3_endpoint_url}  bucket: {local.bucket}")
    mode = "proxied by the MLflow server" if local.serve_artifacts else "written to S3 by clients"
    echo(f"artifacts:   {local.artifact_root} ({mode})")
    echo(f"\n# set these (or: source {local.env_file})")
    for key, value in local.env().items():
        if key == "AWS_SECRET_ACCESS_KEY" and not local.uses_local_credentials:
            # The user's own secret: it is in their environment already and never printed.
            echo(f"# {key} is taken from your environment")
            continue
        echo(f"export {key}={value}")
    if local.uses_local_credentials:
        echo("# local default S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY to choose your own")


def _refuse_ports_of_another_stack(local: LocalStack) -> None:
    ports = [local.mlflow_port, *range(local.s3_port, local.s3_port + SEAWEEDFS_PORT_COUNT)]
    for port in ports:
        if port_free(HOST, port):
            continue
        other = records.holder(local.config, records.folder(), port, besides=local.data_dir)
        if other is not None:
            raise StackError(
                f"port {port} is taken by your local stack in {other.data_dir}, which runs: use it (every "
                f"command finds it from any folder), stop it with `tracking stack down --data-dir "
                f"{other.data_dir}`, or choose other ports (--s3-port/--mlflow-port)"
            )


@stack.command()
@_data_dir_option
def down(data_dir: Path | None) -> None:
    """Stop the processes `up` started; the data folder stays.

    \b
    Example:
      tracking stack down
    """
    config, settings = _settings(data_dir, stopping=True)
    # Stopping needs only the pid files: a damaged stack.json must not keep the servers running.
    local = LocalStack.from_data_dir(config, settings.data_dir, bucket=settings.bucket, stopping=True)
    stopped = local.down()
    records.remove(records.folder(), local.data_dir)
    echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack.command()
@_data_dir_option
def status(data_dir: Path | None) -> None:
    """Show each service's pid, state and URL, and the data folder's size.

    \b
    Example:
      tracking stack status
    """
    config, settings = _settings(data_dir)
    local = LocalStack.from_data_dir(config, settings.data_dir, bucket=settings.bucket)
    report = local.status()
    rows = []
    for service in report.services:
        stale = "dead (stale pid file)" if service.pid is not None else "stopped"
        state = "running" if service.alive else stale
        pid = str(service.pid) if service.pid is not None else "-"
        rows.append([service.name, pid, state, service.url, str(service.log)])
    columns = [
        Column("service"),
        Column("pid"),
        Column("state"),
        Column("url", no_wrap=True),
        Column("log", drop_order=1),
    ]
    table(f"local stack in {report.data_dir}", columns, rows)
    echo(f"backend store: {report.backend_store_uri}")
    echo(f"data folder: {report.data_dir} ({human_size(report.data_bytes)})")
