"""How the command lines print (``tracking`` and ``tracking stack``): tables that fit the terminal, plain columns into
pipes, JSON on request."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click


@dataclass(frozen=True)
class Column:
    """A table column; the lower ``drop_order``, the sooner it goes when the terminal is narrow.

    ``fold_to``: the width its cells may wrap to (None: never wrapped when deciding what fits).
    """

    title: str
    drop_order: int = 99  # 99: never dropped
    no_wrap: bool = False
    fold_to: int | None = None


class UnwrittenOutput(Exception):
    """The command's output could not be written to stdout; ``cause`` says why (EPIPE: its reader stopped reading)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.strerror or str(cause))
        self.cause = cause


@contextmanager
def writing() -> Iterator[None]:
    """Whatever writes stdout in the block: its OSError becomes :class:`UnwrittenOutput`, told apart from the
    command's own OSErrors (a download's, a socket's) by where it was raised, not by what it says."""
    try:
        yield
    except OSError as exc:
        raise UnwrittenOutput(exc) from exc


def echo(message: str = "") -> None:
    """``message`` and a newline on stdout, as ``click.echo`` writes it; see :func:`writing`."""
    with writing():
        click.echo(message)


def human_size(size: float) -> str:
    """``size`` bytes for a person: 512 B, 3.2 MiB (the stack's status shows its data folder this way too)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def plural(count: int, noun: str) -> str:
    """``1 checkpoint``, ``2 checkpoints``: nouns that take an ``s``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# click.Context.meta key: set once a command printed its JSON, so that its failure prints no second document.
JSON_EMITTED = "tracking.json_emitted"


def agree(count: int, one: str, many: str) -> str:
    """The form of a phrase that agrees with ``count``: ``agree(n, "version points", "versions point")``."""
    return one if count == 1 else many


def emit_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, default=str))
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[JSON_EMITTED] = True


def json_error(message: str, code: int, exc: BaseException) -> dict[str, Any]:
    """What a ``--json`` command prints on stdout when it fails: the stderr line's message, its exit status, and
    the error's class (``StorageError``: retry; ``NotFoundError``, ``IntegrityError``, ``UsageError``...)."""
    return {"error": message, "exit_code": code, "type": type(exc).__name__}


def table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal (narrow ones drop columns, then wrap cells); aligned plain text otherwise."""
    if not _is_terminal():
        # One line per row: cells that wrap on a terminal (e.g. "latest\nbest") become one line.
        flat = [[cell.replace("\n", " ") for cell in row] for row in rows]
        widths = [max([len(c.title), *(len(row[i]) for row in flat)]) for i, c in enumerate(columns)]
        for line in ([c.title for c in columns], *flat):
            echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    shown = list(range(len(columns)))
    for index in sorted(shown, key=lambda i: columns[i].drop_order):
        if columns[index].drop_order == 99 or _natural_width(columns, rows, shown) <= console.width:
            break
        shown.remove(index)
    # Cells and titles hold what users wrote (run and metric names, sources): rich would read
    # "[/bold]" or "[link=...]" in them as markup, crash on it or print a hyperlink.
    rendered = Table(title=escape(title), title_justify="left")
    for index in shown:
        rendered.add_column(escape(columns[index].title), no_wrap=columns[index].no_wrap, overflow="fold")
    for row in rows:
        rendered.add_row(*(escape(row[index]) for index in shown))
    with writing():
        console.print(rendered)


def _natural_width(columns: Sequence[Column], rows: Sequence[Sequence[str]], shown: list[int]) -> int:
    """The width a rich table with these columns takes without wrapping: cells, padding and borders."""
    cells = 0
    for i in shown:
        natural = max([len(columns[i].title), *(len(row[i]) for row in rows)])
        cells += min(natural, columns[i].fold_to or natural)
    return cells + 3 * len(shown) + 1


def _is_terminal() -> bool:
    return sys.stdout.isatty()
