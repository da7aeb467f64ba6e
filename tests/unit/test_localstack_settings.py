"""The local stack's settings and its place outside the library: no processes, no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracking.cli import main
from tracking.config import TrackingConfig
from tracking.errors import ConfigError, TrackingError
from tracking.localstack import LocalStack, StackError, StackSettings
from tracking.localstack.supervisor import Supervisor


def test_defaults_without_environment() -> None:
    settings = StackSettings.from_env({})
    assert (settings.bucket, settings.data_dir) == ("mlflow", Path(".tracking"))


def test_environment_then_explicit_argument_wins() -> None:
    env = {"TRACKING_BUCKET": "ckpts", "TRACKING_DATA_DIR": "/srv/stack"}
    settings = StackSettings.from_env(env, bucket="explicit", data_dir=None)
    assert (settings.bucket, settings.data_dir) == ("explicit", Path("/srv/stack"))


def test_invalid_bucket_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="TRACKING_BUCKET"):
        StackSettings.from_env({"TRACKING_BUCKET": "a/b"})
    with pytest.raises(ConfigError, match="TRACKING_BUCKET"):
        LocalStack(bucket="")


def test_unknown_override_is_a_programmer_error() -> None:
    with pytest.raises(TypeError, match="unknown stack settings"):
        StackSettings.from_env({}, buckett="x")


def test_the_environment_is_read_when_asked_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKING_BUCKET", "set-after-import")
    assert StackSettings.from_env().bucket == "set-after-import"


def test_the_library_config_knows_nothing_of_the_stack() -> None:
    config = TrackingConfig.from_env({"TRACKING_BUCKET": "a/b", "TRACKING_DATA_DIR": "elsewhere"})
    assert not hasattr(config, "bucket") and not hasattr(config, "data_dir")


def test_stack_defaults_and_accessors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKING_BUCKET", "from-env")  # read by the CLI, not by LocalStack itself
    stack = LocalStack(TrackingConfig(), tmp_path, s3_port=21000, mlflow_port=21010)
    assert stack.bucket == "mlflow" and stack.data_dir == tmp_path.resolve()
    assert (stack.s3_port, stack.mlflow_port) == (21000, 21010)
    assert stack.s3_endpoint_url == "http://127.0.0.1:21000"
    assert stack.master_url == "http://127.0.0.1:21002"
    assert LocalStack().data_dir == Path(".tracking").resolve()
    assert LocalStack.from_data_dir(None, tmp_path, bucket="other").bucket == "other"
    assert issubclass(StackError, TrackingError)


def test_cli_reads_the_data_folder_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap the long tmp_path
    monkeypatch.setenv("TRACKING_DATA_DIR", str(tmp_path / "from-env"))
    from_env = CliRunner().invoke(main, ["stack", "status"])
    assert from_env.exit_code == 0, from_env.output
    assert f"data folder: {(tmp_path / 'from-env').resolve()} " in from_env.output
    explicit = CliRunner().invoke(main, ["stack", "status", "--data-dir", str(tmp_path / "explicit")])
    assert explicit.exit_code == 0, explicit.output
    assert f"data folder: {(tmp_path / 'explicit').resolve()} " in explicit.output


@pytest.mark.parametrize("command", ["up", "status", "down"])
def test_a_data_folder_that_is_a_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # $TRACKING_DATA_DIR (or ./.tracking) naming a file ended every command in a NotADirectoryError traceback.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "400")
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    monkeypatch.setenv("TRACKING_DATA_DIR", str(afile))

    result = CliRunner().invoke(main, ["stack", command])

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == (
        f"error: the data folder {afile} is a file, not a folder: pass --data-dir (or set TRACKING_DATA_DIR to) a "
        "folder, or move the file away\n"
    )
    assert afile.read_text() == "mine"


def test_up_in_a_data_folder_it_cannot_write_is_a_stack_error_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file where run/ goes (as a read-only folder or a full disk would): NotADirectoryError, then FileExistsError.
    monkeypatch.setattr("tracking.localstack.stack.port_free", lambda host, port: True)  # nothing is started
    data_dir = tmp_path / "stack"
    data_dir.mkdir()
    (data_dir / "run").write_text("not a folder")
    stack = LocalStack(TrackingConfig(), data_dir, s3_port=21000, mlflow_port=21010)

    with pytest.raises(StackError, match=f"cannot prepare the data folder {data_dir}: {data_dir / 'run'}: .*TRACKING"):
        stack.up()
    assert sorted(p.name for p in data_dir.iterdir()) == ["run"]  # nothing made beside it, no mlflow.db


def test_cli_lists_the_stack_commands() -> None:
    listed = CliRunner().invoke(main, ["--help"])
    assert listed.exit_code == 0 and "stack" in listed.output.split("Commands:")[1]
    up = CliRunner().invoke(main, ["stack", "up", "--help"], terminal_width=200)
    assert up.exit_code == 0 and "$TRACKING_DATA_DIR or .tracking" in up.output


def test_the_library_never_imports_the_local_stack_nor_the_test_fixtures() -> None:
    # Every module of the package but the stack's own (walk_packages would import it to recurse) and the
    # fixtures for users' tests (tracking.testing and the autologging it puts back: pytest and moto are not the
    # library's dependencies).
    root = Path(__file__).resolve().parents[2] / "tracking"
    fixtures = ("testing.py", "autologging.py")
    modules = [
        ".".join(("tracking", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for path in sorted(root.rglob("*.py"))
        if "localstack" not in path.relative_to(root).parts and path.name not in ("__main__.py", *fixtures)
    ]
    apart = ("tracking.localstack", *(f"tracking.{name.removesuffix('.py')}" for name in fixtures))
    probe = (
        f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({apart!r})))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_damaged_stack_json_is_kept_while_its_stack_runs_and_down_still_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "400")
    data_dir = (tmp_path / "stack").resolve()
    (data_dir / "run").mkdir(parents=True)
    state = data_dir / "run" / "stack.json"
    state.write_text('{"s3_port": 18333, "mlflow_')  # cut short by a full disk
    # MLflow's server runs (its pid file names a live process that runs its command); SeaweedFS does not.
    running = {"mlflow": 4242}
    monkeypatch.setattr(Supervisor, "owned_pid", lambda self, name: running.get(name))
    stopped: list[str] = []

    def stop(self: Supervisor, names: list[str], timeout: float) -> list[str]:
        stopped.extend(name for name in names if name in running)
        return [name for name in names if name in running]

    monkeypatch.setattr(Supervisor, "stop", stop)

    for command in ("up", "status"):
        refused = CliRunner().invoke(main, ["stack", command, "--data-dir", str(data_dir)])
        assert refused.exit_code == 1, refused.output
        # Was: "cannot read .../stack.json (...); delete it and retry", which left the server without its ports.
        assert "delete it and retry" not in refused.output
        assert "still runs in" in refused.output and "mlflow pid 4242" in refused.output, refused.output
        assert f"run `tracking stack down --data-dir {data_dir}`, which needs only the pid files" in refused.output
    assert state.exists()

    down = CliRunner().invoke(main, ["stack", "down", "--data-dir", str(data_dir)])
    assert down.exit_code == 0 and "stopped: mlflow" in down.output, down.output  # was: the same error, nothing stopped
    assert stopped == ["mlflow"]

    running.clear()
    after = CliRunner().invoke(main, ["stack", "up", "--data-dir", str(data_dir)])
    assert after.exit_code == 1, after.output
    assert "no process of the stack" in after.output and "nothing needs it: delete it" in after.output, after.output


def test_the_stacks_variables_blank_a_session_token_seaweedfs_would_refuse(tmp_path: Path) -> None:
    # Temporary AWS keys in the shell become the stack's S3 identity; their token, sent along, was refused.
    shell = {"AWS_ACCESS_KEY_ID": "ASIATEMPORARY", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "token"}
    stack = LocalStack(TrackingConfig.from_env(shell), tmp_path, s3_port=21000, mlflow_port=21010)
    sourced = {**shell, **stack.env()}  # `source stack.env` in that shell
    assert sourced["AWS_SESSION_TOKEN"] == "" and TrackingConfig.from_env(sourced).aws_session_token is None
    assert stack.access_key_id == "ASIATEMPORARY"
