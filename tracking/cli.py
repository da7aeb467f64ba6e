"""The ``tracking`` command line: a thin shell over the library.

Errors become exit codes by the project's one rule (:func:`tracking.errors.exit_code`): a
:class:`TrackingError` prints one line on stderr and exits 1, a usage error exits 2, and
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from tracking.errors import exit_code, one_line


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            code = exit_code(exc)  # None for click's own exceptions: click maps those itself
            if code is None or ctx.find_root().params.get("debug"):
                raise
            click.echo(f"error: {one_line(exc)}", err=True)
            ctx.exit(code)


# Commands that live outside the library, as "module:attribute": imported only when invoked or
# listed in the help, so that importing the library (or this module) never loads them.
_LAZY_COMMANDS = {"stack": "tracking.localstack.cli:stack"}


class _MainGroup(_Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            module, attribute = _LAZY_COMMANDS[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{_LAZY_COMMANDS[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_MainGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Log PyTorch checkpoints to MLflow on S3, and run a local stack to try it."""


def human_size(size: float) -> str:
    """``size`` bytes for a person: 512 B, 3.2 MiB (the stack's status shows its data folder this way too)."""
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
    """List a run's committed checkpoints (each a logged model). RUN is a run ID or runs:/<id>."""
    from rich.console import Console
    from rich.table import Table

    from tracking.selection import find_checkpoint, list_checkpoints

    logged = list_checkpoints(source)
    if not logged:
        click.echo(f"{source}: no committed checkpoints")
        return
    latest = find_checkpoint(source, "latest").model_id
    best = _best_model(source)
    table = Table(title=f"checkpoints of {source}")
    for column in ("epoch", "step", "metrics", "size", "model ID", ""):
        table.add_column(column)
    for checkpoint in logged:
        manifest = checkpoint.manifest
        marks = [m for m, e in (("latest", latest), ("best", best)) if e == checkpoint.model_id]
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(manifest.metrics.items()))
        size = sum(f.size for f in manifest.files.values())
        step = "-" if manifest.step is None else str(manifest.step)
        table.add_row(str(manifest.epoch), step, metrics, human_size(size), checkpoint.model_id, " ".join(marks))
    Console().print(table)


def _best_model(source: str) -> str | None:
    from tracking.errors import NotFoundError
    from tracking.selection import find_checkpoint

    try:
        return find_checkpoint(source, "best").model_id
    except NotFoundError:
        return None  # no monitored metric: nothing is "best"


def _check_checkpoint(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in ("latest", "best") or value.isdigit():
        return value
    raise click.BadParameter(f"{value!r}: expected latest, best or an epoch number (e.g. 7).")


@main.command()
@_source_argument
@click.option(
    "--checkpoint",
    default="latest",
    show_default=True,
    callback=_check_checkpoint,
    help="latest, best or an epoch number.",
)
def show(source: str, checkpoint: str) -> None:
    """Print a checkpoint's manifest as JSON. RUN: a run ID, runs:/<id>, models:/<model_id> or a registry URI."""
    from tracking.selection import find_checkpoint

    located = find_checkpoint(source, checkpoint)
    click.echo(f"# {located.store.describe(located.path('manifest.json'))}", err=True)
    click.echo(located.manifest.to_json().decode())


@main.command()
@_source_argument
@click.option("--clean", is_flag=True, help="First remove leftovers: unfinished uploads, data no manifest lists.")
@click.option("--force", is_flag=True, help="With --clean: also when the run is still RUNNING (its writer was killed).")
def verify(source: str, clean: bool, force: bool) -> None:
    """Check a run's stored files against their manifests' size and sha256. RUN: a run ID or URI.

    Also lists leftovers of saves that died before committing (LEFTOVER lines): they are not
    failures, nothing loads them; --clean removes them, never touching a committed checkpoint.
    """
    from tracking.audit import clean_leftovers
    from tracking.audit import verify as verify_run
    from tracking.errors import IntegrityError

    if force and not clean:
        raise click.UsageError("--force only applies with --clean.")
    if clean:
        removed = clean_leftovers(source, running=force)
        for item in removed:
            click.echo(f"REMOVED {item}")
        click.echo(f"{len(removed)} leftovers removed")
    report = verify_run(source)
    for path, problem in report.items():
        click.echo(f"{'ok ' if problem is None else 'BAD'} {path}")
    for leftover in report.leftovers:
        click.echo(f"LEFTOVER {leftover}")
    failures = report.failures
    if not failures:
        click.echo(f"{len(report)} files intact" if report else f"{source}: nothing to verify")
    if report.leftovers:
        click.echo(f"{len(report.leftovers)} leftovers; `tracking verify --clean {source}` removes them")
    if failures:
        first = next(iter(failures.values()))
        raise IntegrityError(f"{len(failures)} of {len(report)} files failed: {first}")
