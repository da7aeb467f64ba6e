"""The command line's shape, without a tracking server: help, tables, pipes, and no stray files."""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tracking import output
from tracking.cli import main
from tracking.cli import server as server_module


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


def test_a_command_run_in_process_leaves_pythons_warning_format_as_it_was() -> None:
    """A test that runs a command through CliRunner then sees its later warnings with their file and line."""
    import warnings

    before = warnings.formatwarning
    result = CliRunner().invoke(main, ["runs", "--help"])
    assert result.exit_code == 0, result.output
    assert warnings.formatwarning is before


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


def test_stack_status_into_a_pipe_prints_plain_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    data_dir = tmp_path / ("a-long-folder-name-" * 4) / ".tracking"
    result = CliRunner().invoke(main, ["stack", "status", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert not any(ch in result.output for ch in "│┃━─┏"), "no box drawing into a pipe"
    lines = result.output.splitlines()
    assert lines[0].split() == ["service", "pid", "state", "url", "log"]
    for name in ("seaweedfs", "mlflow"):
        [row] = [line for line in lines if line.startswith(name)]
        assert row.split() == [name, "-", "stopped", row.split()[3], str(data_dir.resolve() / "logs" / f"{name}.log")]


class _Health(http.server.BaseHTTPRequestHandler):
    """Answers /health as an MLflow server does."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def answering_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stack's data folder (run/stack.json) whose MLflow port answers /health; the CLI's default."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    data_dir = tmp_path / "stack"
    (data_dir / "run").mkdir(parents=True)
    settings = {"s3_port": 20000, "mlflow_port": server.server_address[1], "serve_artifacts": False}
    (data_dir / "run" / "stack.json").write_text(json.dumps({**settings, "backend_store_uri": "sqlite:///x.db"}))
    monkeypatch.setenv("TRACKING_DATA_DIR", str(data_dir))
    connect_sets = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    for name in (*connect_sets, "AWS_DEFAULT_REGION"):
        # Set, then deleted: monkeypatch records an unset variable only when it deletes one, and connect()
        # sets what is unset. Without the record, those would outlive the test.
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setattr(server_module, "_announced", False)
    try:
        yield data_dir
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("rank", "said"), [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False), ({"LOCAL_RANK": "1"}, False)]
)
def test_only_the_first_process_says_it_uses_the_local_stack(
    answering_stack: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rank: dict[str, str],
    said: bool,
) -> None:
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in rank.items():
        monkeypatch.setenv(name, value)
    server_module.connect()
    server_module.connect()
    err = capsys.readouterr().err
    assert err.count("using the local stack at http://127.0.0.1:") == (1 if said else 0), err
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
