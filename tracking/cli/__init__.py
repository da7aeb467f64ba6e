"""The ``tracking`` command line (also ``python -m tracking``): a thin shell over the library.

Errors become exit codes by the project's one rule (:func:`tracking.errors.exit_code`): a
:class:`TrackingError` prints one line on stderr and exits 1, a usage error exits 2, and
``--debug`` shows the traceback instead. With ``--json``, a failure also prints
``{"error", "exit_code", "type"}`` on stdout, unless the command printed its own JSON already. Ctrl-C
prints ``error: interrupted (Ctrl-C).`` and exits 130, as the pipelines do. A reader that stops early
(``| head -1``) ends the command quietly with 141, as SIGPIPE ends other commands.
Commands import torch and MLflow only when they run.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import traceback
import warnings
from typing import Any, NoReturn

import click

from tracking.cli import inspect, manage
from tracking.cli.server import mlflow_failure
from tracking.errors import TrackingError, exit_code, format_warning, one_line
from tracking.output import JSON_EMITTED, UnwrittenOutput, emit_json, human_size, json_error

__all__ = ["human_size", "main"]


class _Group(click.Group):
    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        # Read here, before the command's own parsing can fail: a usage error with --json is JSON too.
        options = rest[: rest.index("--")] if "--" in rest else rest
        takes_json = command is not None and any(p.name == "as_json" for p in command.params)
        ctx.meta[_JSON_ERRORS] = takes_json and "--json" in options
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as interrupted:
            # Not click's "Aborted!" and 1, a failed command's status: a script tells Ctrl-C apart by 130, as from
            # the pipelines, and --json still prints one document.
            if ctx.find_root().params.get("debug"):
                traceback.print_exc()  # where it was: a command that hangs is what one interrupts
            message = str(interrupted) or "interrupted (Ctrl-C)."
            if ctx.meta.pop(_JSON_ERRORS, False) and not ctx.meta.get(JSON_EMITTED):
                _emit_error_json(json_error(message, INTERRUPTED, interrupted))
            click.echo(f"error: {message}", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as raised:
            if isinstance(raised, UnwrittenOutput) and raised.cause.errno == errno.EPIPE:
                _reader_gone(ctx)
            # MLflow's own error (a refused or failed request) is reported as ours; --debug shows its traceback.
            unwritten = _output_failure(raised)
            if unwritten is not None:
                _detach_stdout()
            exc = mlflow_failure(raised) or unwritten or raised
            code = exit_code(exc)  # None for click's own exceptions: click maps those itself
            if (code is None and not isinstance(exc, click.ClickException)) or ctx.find_root().params.get("debug"):
                raise
            if ctx.meta.pop(_JSON_ERRORS, False) and not ctx.meta.get(JSON_EMITTED) and unwritten is None:
                if isinstance(exc, click.ClickException):
                    _emit_error_json(json_error(exc.format_message(), exc.exit_code, exc))
                else:
                    _emit_error_json(json_error(one_line(exc), code or 1, exc))
            if code is None:
                raise  # click prints its usage error on stderr and exits 2
            click.echo(f"error: {one_line(exc)}", err=True)
            ctx.exit(code)


def _output_failure(exc: BaseException) -> TrackingError | None:
    """``exc`` as one of ours when it is the command's output that could not be written (``> out.json`` on a full
    disk), else None."""
    if not isinstance(exc, UnwrittenOutput):
        return None
    return TrackingError(f"cannot write the output ({exc}): free space where stdout goes, or send it elsewhere.")


def _emit_error_json(value: dict[str, Any]) -> None:
    """A failed command's JSON error on stdout, if stdout still takes it: the ``error:`` line on stderr and the
    status say the failure either way."""
    try:
        emit_json(value)
    except UnwrittenOutput:
        _detach_stdout()


def _reader_gone(ctx: click.Context) -> NoReturn:
    """End quietly with 141 (128 + SIGPIPE), as a shell reports a command whose reader closed the pipe
    (``| head -1``): not 1, which ``set -o pipefail`` scripts take for the command's own failure.

    SIGPIPE itself stays ignored, as Python leaves it: a socket closed under a request stays a Python error.
    """
    _detach_stdout()
    ctx.exit(CLOSED_PIPE)


def _detach_stdout() -> None:
    """Point stdout at /dev/null once it failed: Python flushes it once more at exit, and a failing flush then
    prints "Exception ignored ... BrokenPipeError" and exits 120 (Python's docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout with no file behind it (a test's CliRunner): nothing to flush there
        pass


# The status of a command stopped by Ctrl-C: 128 + SIGINT, as a shell reports one.
INTERRUPTED = 130

# The status of a command whose reader closed the pipe: 128 + SIGPIPE, as a shell reports one.
CLOSED_PIPE = 128 + getattr(signal, "SIGPIPE", 13)

# ctx.meta key: whether a failure of the command invoked prints a JSON error object on stdout (it took --json).
_JSON_ERRORS = "tracking.json_errors"


# Commands that live outside the library, as "module:attribute": imported only when invoked or
# listed in the help, so that importing the library (or this module) never loads them.
_LAZY_COMMANDS = {"stack": "tracking.localstack.cli:stack"}


class _WarningLines(logging.Handler):
    """The library's logged warnings as ``warning: ...`` lines on stderr, like its warnings and the ``error:`` lines.

    Without a handler, Python prints a logged warning bare: a line nobody can tell from an error.
    """

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(format_warning(record.getMessage(), UserWarning, "", 0), nl=False, err=True)


class _MainGroup(_Group):
    def invoke(self, ctx: click.Context) -> Any:
        library = logging.getLogger("tracking")
        handler = _WarningLines(logging.WARNING)
        library.addHandler(handler)
        # One line, like the errors; put back after, so a process that runs a command in-process (a test's
        # CliRunner) gets Python's own format for its later warnings, with their file and line.
        shown, warnings.formatwarning = warnings.formatwarning, format_warning
        try:
            return super().invoke(ctx)
        finally:
            warnings.formatwarning = shown
            library.removeHandler(handler)

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


@click.group(cls=_MainGroup, context_settings={"max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Find, check, download, prune and register the PyTorch checkpoints of MLflow runs.

    \b
    With MLFLOW_TRACKING_URI unset, commands use the local stack when one runs
    (`tracking stack up`). Every command takes --help; most take --json.

    \b
    Example:
      tracking runs
      tracking checkpoints 3f2a...e1 --json
    """


for _command in (*inspect.COMMANDS, *manage.COMMANDS):
    main.add_command(_command)
