"""The exceptions the library raises on bad data, missing data and failing storage.

Programmer mistakes (wrong argument types, impossible values) raise the builtin
``TypeError`` / ``ValueError`` instead, so that ``except TrackingError`` only
catches conditions a user can act on. :func:`exit_code` and :func:`one_line` are
the one rule for how a command line reports them: exit status 1 and an ``error:`` line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class TrackingError(Exception):
    """Base class: something about a run, its artifacts or the store is wrong."""


class ConfigError(TrackingError):
    """A setting (argument or environment variable) is missing or malformed."""


class NotFoundError(TrackingError):
    """A run, checkpoint, artifact, registry alias or class does not exist."""


class NotACheckpoint(NotFoundError):
    """A logged model asked for as a checkpoint that is another kind (a whole model): which one, of which run."""

    def __init__(self, message: str, run_id: str, name: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.name = name

    def __reduce__(self) -> tuple[type[NotACheckpoint], tuple[str, str, str]]:
        # Sent to the other ranks of a job pickled: by its message alone it would not rebuild.
        return type(self), (str(self), self.run_id, self.name)


class IntegrityError(TrackingError):
    """Stored bytes or a manifest do not match what was recorded, or are unreadable."""


class StorageError(TrackingError):
    """The artifact store could not be reached or refused an operation."""


class UnsafeClassError(TrackingError):
    """A recorded class path names something that must never be instantiated."""


class MismatchError(TrackingError):
    """Stored weights do not fit the model they are loaded into (keys or shapes differ)."""


def exit_code(
    exc: BaseException, also: tuple[type[BaseException], ...] = (), refused: tuple[type[BaseException], ...] = ()
) -> int | None:
    """The status a command line exits with for ``exc``: 1 for a :class:`TrackingError` or one of ``also``; 2, as
    for a usage error, for one of ``refused`` (a command that must not run now, whatever its arguments).

    None for anything else: the caller re-raises it, so an unexpected error keeps its traceback.
    """
    if isinstance(exc, refused):
        return 2
    return 1 if isinstance(exc, (TrackingError, *also)) else None


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line, whatever newlines it holds, for an ``error:`` line on stderr."""
    return " ".join(str(exc).split())


def load_refusal(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, on one line, without torch's own advice.

    torch's message suggests re-running with ``weights_only=False``: for a file from a store,
    that is the advice to run whatever code it holds, so its paragraphs that mention
    ``weights_only`` are dropped and only what was refused is kept.
    """
    paragraphs = [" ".join(p.split()) for p in str(exc).split("\n\n")]
    kept = [p for p in paragraphs if p and "weights_only" not in p and "Weights only load failed" not in p]
    return " ".join(kept) or type(exc).__name__


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as one ``warning: ...`` line, for ``warnings.formatwarning`` in the command line.

    Python's own format adds the file, line and source line that raised it: two lines that say
    nothing to someone running a command (a stale pointer tag is a hint gone wrong, not a bug).
    """
    return f"warning: {one_line(Exception(str(message)))}\n"


def print_error(message: str) -> None:
    """Write ``error: <message>`` and its newline to stderr in one write.

    The ranks of a torchrun job share one stderr: ``print`` writes the text and the newline
    separately, and two ranks failing together then run their lines into one.
    """
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def run_command(
    action: Callable[[], object],
    also: tuple[type[BaseException], ...] = (),
    refused: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a command's ``action`` and return its exit status: 0, or 1 (2 for ``refused``, :func:`exit_code`) with
    ``error: <one line>`` on stderr.

    Errors :func:`exit_code` does not know propagate with their traceback; warnings print as
    one ``warning:`` line, as the command line's do.
    """
    import warnings

    shown, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        action()
    except Exception as exc:
        code = exit_code(exc, also, refused)
        if code is None:
            raise
        print_error(one_line(exc))
        return code
    finally:
        warnings.formatwarning = shown
    return 0
