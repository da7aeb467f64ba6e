"""The command line's shape, without a tracking server: help, tables, pipes, and no stray files."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tracking.cli import main, output


def _commands(group: click.Group, ctx: click.Context) -> list[tuple[str, click.Command]]:
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        found.append((name, command))
        if isinstance(command, click.Group):
            found += [(f"{name} {sub}", c) for sub, c in _commands(command, ctx)]
    return found


def test_every_command_has_help_with_an_example() -> None:
    ctx = click.Context(main)
    commands = _commands(main, ctx)
    assert {"runs", "checkpoints", "show", "verify", "download", "gc", "register", "stack up"} <= {
        name for name, _ in commands
    }
    for name, _ in commands:
        result = CliRunner().invoke(main, [*name.split(), "--help"])
        assert result.exit_code == 0, result.output
        assert "Example:" in result.output, f"`tracking {name} --help` shows no example"


ROWS = [
    [
        str(epoch),
        str(epoch * 150),
        "train_loss=0.1265, val_accuracy=0.9561, val_loss=0.1428",
        "21.6 KiB",
        f"m-{epoch:032x}",
        "latest\nbest" if epoch == 10 else "",
    ]
    for epoch in range(8, 11)
]
COLUMNS = [
    output.Column("epoch"),
    output.Column("step", drop_order=1),
    output.Column("metrics", drop_order=3, fold_to=20),
    output.Column("size", drop_order=2),
    output.Column("model ID", no_wrap=True),
    output.Column("", fold_to=6),
]


def test_tables_fit_an_80_column_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(output, "_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    output.table("checkpoints of a run", COLUMNS, ROWS)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    assert all(row[4] in text for row in ROWS), "model IDs are never cut"
    assert "val_loss=0.1428" in text, "metrics wrap rather than vanish"


def test_wide_terminals_show_every_column(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(output, "_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")
    output.table("checkpoints of a run", COLUMNS, ROWS)
    text = capsys.readouterr().out
    assert "step" in text and "1500" in text and "21.6 KiB" in text


def test_pipes_get_plain_columns(capsys: pytest.CaptureFixture[str]) -> None:
    output.table("checkpoints of a run", COLUMNS, ROWS)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(ROWS), "one line per row"
    assert lines[-1].endswith("latest best")
    assert lines[0].split() == ["epoch", "step", "metrics", "size", "model", "ID"]
    assert not any(ch in "".join(lines) for ch in "│┃━"), "no box drawing into a pipe"
    assert lines[1].split()[:2] == ["8", "1200"]


def test_without_a_server_commands_fail_in_one_line_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TRACKING_DATA_DIR", str(tmp_path / "no-stack"))
    monkeypatch.chdir(tmp_path)
    for args in (["runs"], ["checkpoints", "f" * 32], ["verify", "f" * 32]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert result.stderr.count("\n") == 1 and "tracking stack up" in result.stderr
        assert "MLFLOW_TRACKING_URI" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no mlflow.db, no mlruns, no stack folder"
