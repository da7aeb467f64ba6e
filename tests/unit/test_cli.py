"""The command line over a real run: listing, showing and verifying checkpoints."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner

import tracking
from pipelines.models import Model
from tracking import catalog, output
from tracking.cli import main
from tracking.run import open_run
from tracking.selection import find_checkpoint


@pytest.fixture
def run_id(experiment: str) -> str:
    return _log_run()


@pytest.fixture
def s3_run_id(s3_experiment: str) -> str:
    """A run like ``run_id``'s on (moto) S3 only, read into memory: no temporary file on the way."""
    return _log_run()


def _log_run() -> str:
    model = Model(6)
    checkpointer = tracking.Checkpointer(monitor="val_loss")
    with mlflow.start_run() as run:
        tracking.log_state_dict(model)
        for epoch, loss in [(1, 0.5), (2, 0.2), (3, 0.4)]:
            checkpointer.save(model, epoch=epoch, step=epoch * 10, metrics={"val_loss": loss})
    return str(run.info.run_id)


def test_checkpoints_lists_epochs_with_latest_and_best(run_id: str) -> None:
    result = CliRunner().invoke(main, ["checkpoints", run_id], terminal_width=200)
    assert result.exit_code == 0, result.output
    # A table in a terminal, plain columns into a pipe: either way, one row per epoch.
    cells = [line.replace("│", " ").split() for line in result.output.splitlines()]
    rows = {row[0]: row for row in cells if row and row[0].isdecimal()}
    assert sorted(rows) == ["1", "2", "3"]
    assert "best" in rows["2"] and "latest" in rows["3"] and "latest" not in rows["1"]
    for checkpoint in tracking.list_checkpoints(run_id):
        assert checkpoint.model_id in rows[str(checkpoint.epoch)]


def test_show_prints_the_manifest(run_id: str) -> None:
    result = CliRunner().invoke(main, ["show", run_id, "--checkpoint", "best"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert (manifest["epoch"], manifest["metrics"]) == (2, {"val_loss": 0.2})


def test_verify_passes_then_reports_a_corrupted_file(run_id: str) -> None:
    ok = CliRunner().invoke(main, ["verify", run_id])
    assert ok.exit_code == 0, ok.output
    assert "4 files intact" in ok.output
    second = find_checkpoint(run_id, 2)
    second.store.write_bytes(second.path("checkpoint.pt"), b"not a checkpoint")
    bad = CliRunner().invoke(main, ["verify", run_id])
    assert bad.exit_code == 1
    assert f"BAD checkpoint-epoch-0002 ({second.model_id})/checkpoint.pt" in bad.output
    assert len(bad.stderr.strip().splitlines()) == 1 and "1 of 4 files failed" in bad.stderr


def test_verify_says_what_is_wrong_with_each_bad_file(s3_run_id: str) -> None:
    for epoch in (1, 3):
        damaged = find_checkpoint(s3_run_id, epoch)
        damaged.store.write_bytes(damaged.path("checkpoint.pt"), b"not a checkpoint")
    result = CliRunner().invoke(main, ["verify", s3_run_id])
    assert result.exit_code == 1, result.output
    assert result.stdout.count("is 16 bytes, but its manifest says") == 2, result.stdout


def test_errors_are_one_line_and_exit_1(experiment: str) -> None:
    result = CliRunner().invoke(main, ["checkpoints", "ffffffffffffffffffffffffffffffff"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "not found" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert CliRunner().invoke(main, ["show"]).exit_code == 2
    malformed = CliRunner().invoke(main, ["checkpoints", "s3://bucket/key"])
    assert malformed.exit_code == 2 and "is not a run ID" in malformed.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["show", "f" * 32, "--checkpoint", "²"],
        ["show", "f" * 32, "--checkpoint", "١"],
        ["download", "f" * 32, "--checkpoint", "²", "--to", "out"],
        ["register", "f" * 32, "seed", "--checkpoint", "١"],
        ["register", "f" * 32, ""],
        ["register", "f" * 32, "   "],
        # A model ID copied from `tracking checkpoints` without its models:/ scheme.
        ["show", "m-" + "f" * 32],
        # An artifact path names no checkpoint: --checkpoint picks one.
        ["show", f"runs:/{'f' * 32}/checkpoints"],
        ["checkpoints", f"runs:/{'f' * 32}/state_dict"],
    ],
)
def test_arguments_the_library_refuses_are_usage_errors(tracking_store: str, args: list[str]) -> None:
    # isdigit() takes "²" and "١"; the library reads ASCII digits only, and wants a model name.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Error:" in result.stderr and "Traceback" not in result.output


def test_a_bare_model_id_and_an_artifact_path_say_what_to_pass(tracking_store: str) -> None:
    model_id = "m-" + "f" * 32
    bare = CliRunner().invoke(main, ["show", model_id])
    assert f"models:/{model_id}" in bare.stderr, bare.output
    with_path = CliRunner().invoke(main, ["download", f"runs:/{'f' * 32}/foo", "--to", "out"])
    assert "--checkpoint" in with_path.stderr and "'foo'" in with_path.stderr, with_path.output


def test_checkpoints_of_a_models_uri_lists_its_run(s3_run_id: str) -> None:
    best = find_checkpoint(s3_run_id, "best").model_id
    result = CliRunner().invoke(main, ["checkpoints", f"models:/{best}", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [(row["epoch"], row["latest"], row["best"]) for row in listed] == [
        (1, False, False),
        (2, False, True),
        (3, True, False),
    ]


def test_download_of_the_state_dict_of_a_run_without_one_is_refused(s3_experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    to = tmp_path / "weights"
    result = CliRunner().invoke(main, ["download", run.info.run_id, "--checkpoint", "state_dict", "--to", str(to)])
    assert result.exit_code == 1, result.output
    assert run.info.run_id in result.stderr and "--checkpoint latest" in result.stderr
    assert not to.exists()


def test_register_of_a_run_without_a_best_says_to_pick_latest(s3_experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)  # no metrics: no best
    result = CliRunner().invoke(main, ["register", run.info.run_id, "seed"])  # --checkpoint best by default
    assert result.exit_code == 1, result.output
    assert "records no best checkpoint" in result.stderr and "'latest'" in result.stderr, result.stderr


def test_register_with_an_alias_in_use_says_which_version_it_named(s3_run_id: str) -> None:
    first = CliRunner().invoke(main, ["register", s3_run_id, "seed", "--alias", "champion"])
    assert first.exit_code == 0, first.output
    assert "named version" not in first.output
    second = CliRunner().invoke(main, ["register", s3_run_id, "seed", "--checkpoint", "3", "--alias", "champion"])
    assert second.exit_code == 0, second.output
    assert "alias champion named version 1 before; models:/seed/1 still loads it" in second.output
    third = CliRunner().invoke(main, ["register", s3_run_id, "seed", "--alias", "champion", "--json"])
    assert json.loads(third.stdout)["alias_moved_from"] == "2"


def test_a_models_uri_takes_no_checkpoint_selector(run_id: str) -> None:
    pinned = f"models:/{find_checkpoint(run_id, 'best').model_id}"
    for args in (["show", pinned, "--checkpoint", "best"], ["download", pinned, "--checkpoint", "3", "--to", "x"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "names one checkpoint already" in result.stderr and "Traceback" not in result.output
    assert CliRunner().invoke(main, ["show", pinned]).exit_code == 0  # the default picks nothing


@pytest.mark.parametrize("variable", ["AWS_MAX_ATTEMPTS", "MLFLOW_HTTP_REQUEST_TIMEOUT"])
def test_malformed_client_variables_are_one_line(run_id: str, variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "abc")
    result = CliRunner().invoke(main, ["show", run_id])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and f"{variable}='abc'" in result.stderr


def test_download_to_a_full_disk_leaves_no_partial_file(s3_run_id: str, tmp_path: Path) -> None:
    run_id = s3_run_id
    size = find_checkpoint(run_id, "best").manifest.files["checkpoint.pt"].size
    to = tmp_path / "best"
    # A file size limit below checkpoint.pt's stands in for a full disk: the write fails part way.
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, previous[1]))
    try:
        result = CliRunner().invoke(main, ["download", run_id, "--checkpoint", "best", "--to", str(to)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and str(to) in result.stderr
    assert not to.exists(), sorted(str(p) for p in to.rglob("*"))

    # Into a folder that exists: it is left as it was.
    to.mkdir()
    (to / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    blocked = CliRunner().invoke(main, ["download", run_id, "--to", str(tmp_path / "file" / "sub")])
    assert blocked.exit_code == 1 and blocked.stderr.count("\n") == 1, blocked.output
    assert [p.name for p in to.iterdir()] == ["notes.txt"]


def test_a_checkpoint_file_deleted_by_hand_is_named_with_what_to_do(s3_run_id: str, tmp_path: Path) -> None:
    first = find_checkpoint(s3_run_id, 1)
    first.store.delete(first.path("checkpoint.pt"))
    for args in (["download", s3_run_id, "--checkpoint", "1", "--to", str(tmp_path / "one")], ["verify", s3_run_id]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "checkpoint.pt is listed in its manifest but missing" in result.stderr, result.stderr
        assert "another checkpoint" in result.stderr


def test_a_checkpoint_left_out_of_a_listing_is_one_warning_line(s3_run_id: str) -> None:
    first = find_checkpoint(s3_run_id, 1)
    first.store.write_bytes(first.path("manifest.json"), b"{not json")
    result = CliRunner().invoke(main, ["checkpoints", s3_run_id, "--json"])
    assert result.exit_code == 0, result.output
    assert [row["epoch"] for row in json.loads(result.stdout)] == [2, 3]
    [line] = result.stderr.splitlines()
    assert line.startswith(f"warning: run {s3_run_id}: left out checkpoint-epoch-0001"), result.stderr


def test_a_dry_run_of_gc_on_a_running_run_says_that_deleting_needs_force(s3_experiment: str) -> None:
    with mlflow.start_run() as run:
        for epoch in (1, 2):
            tracking.log_checkpoint(Model(6), epoch=epoch)
        args = ["gc", run.info.run_id, "--keep-last", "1", "--dry-run"]
        dry = CliRunner().invoke(main, args)
        assert dry.exit_code == 0, dry.output
        assert "still RUNNING" in dry.output.splitlines()[-1] and "--force" in dry.output.splitlines()[-1]
        assert json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)["needs_force"] is True
        forced = CliRunner().invoke(main, [*args, "--force"])
        assert "RUNNING" not in forced.output, forced.output


@pytest.mark.parametrize("ranking", [["--monitor", "train_loss"], ["--mode", "max"]])
def test_gc_refuses_a_ranking_without_keep_best(ranking: list[str]) -> None:
    result = CliRunner().invoke(main, ["gc", "f" * 32, "--keep-last", "2", *ranking])
    assert result.exit_code == 2, result.output
    assert "--keep-best" in result.stderr and "Traceback" not in result.output


def test_gc_says_one_checkpoint(run_id: str) -> None:
    result = CliRunner().invoke(main, ["gc", run_id, "--keep-last", "1", "--keep-best", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"run {run_id}: 1 checkpoint would be deleted (dry run: nothing changed)"


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands print as on a terminal (rich tables), 200 columns wide."""
    monkeypatch.setattr(output, "_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")


def test_what_users_wrote_is_printed_not_read_as_markup(experiment: str, terminal: None) -> None:
    names = ["[/bold]", "[link=https://evil.example]click[/link]", "[red]x"]
    model = Model(6)
    for name in names:
        with mlflow.start_run(run_name=name):
            tracking.log_checkpoint(model, epoch=1, metrics={"val_loss": 0.5}, monitor="val_loss")
            mlflow.set_tag("tracking.checkpoint.monitor", "[/]")  # shown as the best's metric
    result = CliRunner().invoke(main, ["runs", "--experiment", f"unit-{experiment}"])
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.output
    assert "\x1b]8;" not in result.output  # no hyperlink escape


def test_runs_say_which_model_made_each_run(experiment: str, run_id: str, terminal: None) -> None:
    [summary] = json.loads(CliRunner().invoke(main, ["runs", "--experiment", f"unit-{experiment}", "--json"]).stdout)
    assert summary["model_class"] == "pipelines.models:Model"
    assert summary["pipeline"] is None  # not made by a pipeline: no `pipeline` param
    result = CliRunner().invoke(main, ["runs", "--experiment", f"unit-{experiment}"])
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.output.splitlines() if run_id in line]
    assert "made by" in result.output and " Model " in row


def test_a_bad_pointer_tag_is_one_warning_line(tracking_store: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from tracking.layout import TAG_LATEST

    experiment_id = mlflow.create_experiment("cli-warning", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    MlflowClient().set_tag(run.info.run_id, TAG_LATEST, "not-a-model-id")
    done = subprocess.run(
        [sys.executable, "-m", "tracking", "show", run.info.run_id, "--checkpoint", "latest"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    warning_lines = [line for line in done.stderr.splitlines() if "not-a-model-id" in line or "Warning" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith(f"warning: run {run.info.run_id}: tag "), done.stderr
    assert json.loads(done.stdout)["epoch"] == 1


KEY_FIELDS = ("key", "keyed_by", "epoch", "step")


def test_every_json_row_about_a_checkpoint_says_its_key_epoch_and_step(s3_run_id: str, tmp_path: Path) -> None:
    run_id = s3_run_id  # keyed by epoch, each checkpoint recording the global step epoch * 10

    def rows(*args: str) -> Any:
        result = CliRunner().invoke(main, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def numbers(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[name] for name in KEY_FIELDS)

    assert [numbers(row) for row in rows("checkpoints", run_id)] == [(e, "epoch", e, e * 10) for e in (1, 2, 3)]
    assert numbers(rows("show", run_id, "--checkpoint", "best")) == (2, "epoch", 2, 20)
    assert numbers(rows("download", run_id, "--checkpoint", "1", "--to", str(tmp_path / "one"))) == (1, "epoch", 1, 10)
    weights = rows("download", run_id, "--checkpoint", "state_dict", "--to", str(tmp_path / "weights"))
    assert numbers(weights) == (None, None, None, None)  # a state dict, keyed by nothing
    (deleted,) = rows("gc", run_id, "--keep-last", "1", "--keep-best", "1", "--dry-run")["deleted"]
    assert numbers(deleted) == (1, "epoch", 1, 10)
    (summary,) = rows("runs", "--experiment", "unit-s3")
    assert [summary[f"latest_{name}"] for name in ("key", "epoch", "step")] == [3, 3, 30]
    assert [summary[f"best_{name}"] for name in ("key", "epoch", "step")] == [2, 2, 20]
    registered = rows("register", run_id, "seed", "--checkpoint", "best")
    assert (registered["checkpoint"], *numbers(registered)) == ("checkpoint-epoch-0002", 2, "epoch", 2, 20)


def test_runs_of_a_deleted_experiment_says_it_is_deleted_and_how_to_restore_it(tracking_store: str) -> None:
    # An empty table, exit status 0, and not a word that the experiment was deleted.
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = client.create_experiment("cli-deleted")
    client.delete_experiment(experiment_id)

    result = CliRunner().invoke(main, ["runs", "--experiment", "cli-deleted"])

    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "'cli-deleted' is deleted" in result.stderr
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in result.stderr
    missing = CliRunner().invoke(main, ["runs", "--experiment", "cli-never-made"])
    assert missing.exit_code == 1 and "no experiment 'cli-never-made'" in missing.stderr, missing.output


def test_runs_lists_every_run_when_the_store_of_one_cannot_be_read(s3_experiment: str, tracking_store: str) -> None:
    # One run whose artifacts live where these credentials cannot read (another team's bucket) failed the
    # whole listing, hiding every other run.
    import sqlalchemy

    readable, elsewhere = _log_run(), _log_run()
    engine = sqlalchemy.create_engine(tracking_store)
    try:
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.text("UPDATE runs SET artifact_uri = :uri WHERE run_uuid = :run"),
                {"uri": f"s3://no-such-bucket/{elsewhere}/artifacts", "run": elsewhere},
            )
    finally:
        engine.dispose()

    listed = CliRunner().invoke(main, ["runs", "--experiment", "unit-s3", "--json"])

    assert listed.exit_code == 0, listed.output
    sizes = {row["run_id"]: row["size_bytes"] for row in json.loads(listed.stdout)}
    assert sizes[elsewhere] is None and sizes[readable] > 0
    assert listed.stderr.count("\n") == 1 and f"warning: run {elsewhere}" in listed.stderr, listed.stderr
    assert "no-such-bucket" in listed.stderr
    table = CliRunner().invoke(main, ["runs", "--experiment", "unit-s3"])
    row = next(line for line in table.stdout.splitlines() if line.startswith(elsewhere))
    assert table.exit_code == 0 and row.rstrip().endswith("?"), table.output
    # When no listed run's store answers, the settings are what is wrong: an error, not a table of "?".
    alone = CliRunner().invoke(main, ["runs", "--experiment", "unit-s3", "--limit", "1"])
    assert alone.exit_code == 1 and "no-such-bucket" in alone.stderr, alone.output


def test_download_force_over_another_download_leaves_only_the_new_checkpoint(s3_run_id: str, tmp_path: Path) -> None:
    to = tmp_path / "weights"
    first = CliRunner().invoke(main, ["download", s3_run_id, "--checkpoint", "1", "--to", str(to)])
    assert first.exit_code == 0, first.output
    (to / "notes.txt").write_text("mine")
    args = ["download", s3_run_id, "--checkpoint", "state_dict", "--to", str(to), "--force"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # The previous download's checkpoint.pt beside the state dict's manifest: a folder of two checkpoints.
    assert sorted(p.name for p in to.iterdir()) == ["manifest.json", "notes.txt", "state_dict.pt"]
    assert "removed checkpoint.pt" in result.output and "kept notes.txt" in result.output, result.output


def test_a_download_whose_last_move_fails_leaves_the_folder_as_it_was(s3_run_id: str, tmp_path: Path) -> None:
    to = tmp_path / "one"
    CliRunner().invoke(main, ["download", s3_run_id, "--checkpoint", "1", "--to", str(to)])
    before = (to / "checkpoint.pt").read_bytes()
    (to / "manifest.json").unlink()
    (to / "manifest.json").mkdir()  # the last file's move fails, after checkpoint.pt's
    result = CliRunner().invoke(main, ["download", s3_run_id, "--checkpoint", "3", "--to", str(to), "--force"])
    assert result.exit_code == 1, result.output
    assert f"{to} is as it was" in result.stderr and "manifest.json" in result.stderr, result.stderr
    assert (to / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in to.iterdir()) == ["checkpoint.pt", "manifest.json"]


def test_ctrl_c_while_a_forced_download_moves_its_files_in_leaves_the_previous_download(
    s3_run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from tracking import downloader

    to = tmp_path / "one"
    CliRunner().invoke(main, ["download", s3_run_id, "--checkpoint", "1", "--to", str(to)])
    before = {p.name: p.read_bytes() for p in to.iterdir()}
    moved = os.replace

    def interrupted(src: Any, dst: Any) -> None:
        if Path(dst) == to / "manifest.json" and ".previous" not in str(src):  # the new manifest's move
            raise KeyboardInterrupt
        moved(src, dst)

    monkeypatch.setattr(downloader.os, "replace", interrupted)
    result = CliRunner().invoke(main, ["download", s3_run_id, "--checkpoint", "3", "--to", str(to), "--force"])
    assert result.exit_code == 130 and "interrupted (Ctrl-C)" in result.stderr, result.output
    assert {p.name: p.read_bytes() for p in to.iterdir()} == before  # no staging folder, nothing half-placed


def test_ctrl_c_while_a_download_reads_leaves_no_folder(
    s3_run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracking.cli import manage

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(manage, "_read", interrupted)
    to = tmp_path / "new" / "weights"
    result = CliRunner().invoke(main, ["download", s3_run_id, "--to", str(to)])
    assert result.exit_code == 130 and "interrupted (Ctrl-C)" in result.stderr, result.output
    assert not to.exists()


def test_a_failing_json_command_prints_a_json_error_on_stdout(tracking_store: str) -> None:
    missing = CliRunner().invoke(main, ["checkpoints", "f" * 32, "--json"])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: "), missing.output
    error = json.loads(missing.stdout)
    assert error == {"error": missing.stderr.removeprefix("error: ").strip(), "exit_code": 1, "type": "NotFoundError"}
    usage = CliRunner().invoke(main, ["show", "f" * 32, "--checkpoint", "²", "--json"])
    assert usage.exit_code == 2 and "Error:" in usage.stderr, usage.output
    assert json.loads(usage.stdout)["exit_code"] == 2
    assert CliRunner().invoke(main, ["checkpoints", "f" * 32]).stdout == "", "without --json, stdout stays empty"


@pytest.mark.slow
def test_a_failing_verify_json_is_one_document_with_the_error(s3_run_id: str) -> None:
    second = find_checkpoint(s3_run_id, 2)
    second.store.write_bytes(second.path("checkpoint.pt"), b"not a checkpoint")
    result = CliRunner().invoke(main, ["verify", s3_run_id, "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["intact"] is False and report["exit_code"] == 1 and "1 of 4 files failed" in report["error"]


def test_gc_of_a_checkpoint_two_versions_point_at_says_versions_point(s3_run_id: str) -> None:
    for name in ("seed", "other"):
        assert CliRunner().invoke(main, ["register", s3_run_id, name, "--checkpoint", "1"]).exit_code == 0
    result = CliRunner().invoke(main, ["gc", s3_run_id, "--keep-last", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("kept epoch 1")]
    assert "registry versions " in line and " point at it; delete those versions first" in line, line


def test_show_prints_the_state_dicts_manifest_as_download_takes_it(s3_run_id: str) -> None:
    result = CliRunner().invoke(main, ["show", s3_run_id, "--checkpoint", "state_dict", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert list(shown["manifest"]["files"]) == ["state_dict.pt"] and shown["model_id"] is None
    assert shown["uri"] == f"runs:/{s3_run_id}/state_dict"


def test_verify_of_a_models_uri_checks_that_checkpoint_and_gc_refuses_one(s3_run_id: str) -> None:
    assert CliRunner().invoke(main, ["register", s3_run_id, "seed", "--alias", "champion"]).exit_code == 0
    best = find_checkpoint(s3_run_id, "best")
    result = CliRunner().invoke(main, ["verify", "models:/seed@champion"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"{best.label} of run {s3_run_id}: 1 file intact", result.output
    assert json.loads(CliRunner().invoke(main, ["verify", "models:/seed@champion", "--json"]).stdout)["files"] == {
        f"{best.label}/checkpoint.pt": None
    }
    run_level = (["gc", "models:/seed@champion", "--keep-last", "1"], ["verify", "--clean", f"models:/{best.model_id}"])
    for args in run_level:
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 2 and f"pass the run ID, `tracking {args[0]}" in refused.stderr, refused.output
        assert s3_run_id in refused.stderr
    assert len(tracking.list_checkpoints(s3_run_id)) == 3


def test_verify_of_a_registered_checkpoint_whose_run_was_deleted_checks_it_as_load_reads_it(s3_run_id: str) -> None:
    assert CliRunner().invoke(main, ["register", s3_run_id, "seed", "--alias", "champion"]).exit_code == 0
    best = find_checkpoint(s3_run_id, "best")
    mlflow.MlflowClient().delete_run(s3_run_id)  # training done, the run cleaned up; the registered checkpoint stays
    assert tracking.load("models:/seed@champion").epoch == best.manifest.epoch
    result = CliRunner().invoke(main, ["verify", "models:/seed@champion"])
    assert result.exit_code == 0, result.output  # was "run ... is deleted; restore it ... to use its artifacts"
    said = f"{best.label} of run {s3_run_id}, which is deleted: 1 file intact"
    assert result.output.splitlines() == [f"ok  {best.label}/checkpoint.pt", said], result.output
    # A run's own commands still say it is deleted.
    refused = CliRunner().invoke(main, ["verify", s3_run_id])
    assert refused.exit_code == 1 and f"run {s3_run_id} is deleted" in refused.stderr, refused.output


def test_a_checkpoint_whose_manifest_is_gone_is_none_in_runs_and_in_errors_as_for_the_loader(s3_run_id: str) -> None:
    second = tracking.list_checkpoints(s3_run_id)[1]  # epoch 2, the run's best
    handle = open_run(s3_run_id)
    # A deletion (retention, gc) that died after the manifest: the model stays READY, with no checkpoint.
    catalog.get(handle.client, str(second.model_id), handle.config).store.delete("manifest.json")
    assert tracking.load(s3_run_id, "best").epoch == 3
    (row,) = json.loads(CliRunner().invoke(main, ["runs", "--experiment", "unit-s3", "--json"]).stdout)
    # Was 3 checkpoints, best epoch 2 (val_loss=0.2), which loads for no one.
    assert (row["checkpoints"], row["best_epoch"], row["best_value"], row["latest_epoch"]) == (2, 3, 0.4, 3), row
    refused = CliRunner().invoke(main, ["show", s3_run_id, "--checkpoint", "2"])
    assert refused.exit_code == 1, refused.output
    assert "no committed checkpoint for epoch 2; committed epochs: 1, 3." in refused.stderr  # was "1, 2, 3"


def test_gc_that_deletes_the_runs_best_says_where_best_moves(s3_experiment: str) -> None:
    model = Model(6)
    checkpointer = tracking.Checkpointer(monitor="val_loss")
    with mlflow.start_run() as run:
        for epoch, (val, train) in enumerate([(0.2, 0.5), (0.4, 0.1), (0.3, 0.3)], start=1):
            checkpointer.save(model, epoch=epoch, metrics={"val_loss": val, "train_loss": train})
    run_id = run.info.run_id
    best = find_checkpoint(run_id, "best")  # epoch 1 by val_loss; epoch 2 is best by train_loss
    args = ["gc", run_id, "--keep-best", "1", "--monitor", "train_loss", "--mode", "min", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    said = result.output
    assert f"the run's best checkpoint, epoch 1 ({best.model_id}, val_loss=0.2), would be deleted" in said, said
    assert "best would move to epoch 2" in said and "ranked by train_loss instead of val_loss" in said, said
    moved = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)["best_moved"]
    assert (moved["from"]["epoch"], moved["to"]["epoch"], moved["monitor"]) == (1, 2, "train_loss")
    done = CliRunner().invoke(main, args[:-1])
    assert "was deleted: best moved to epoch 2" in done.output, done.output
    assert find_checkpoint(run_id, "best").manifest.epoch == 2


def test_register_under_a_name_holding_whole_models_is_refused_unless_allowed(s3_experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
        tracking.log_model(model, registered_model_name="wholemodel", pip_requirements=["torch"])
    args = ["register", run.info.run_id, "wholemodel", "--checkpoint", "latest"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1, refused.output
    assert "'wholemodel' holds version 1 that is no checkpoint" in refused.stderr, refused.stderr
    assert "--allow-mixed" in refused.stderr and "wholemodel-checkpoints" in refused.stderr
    allowed = CliRunner().invoke(main, [*args, "--allow-mixed"])
    assert allowed.exit_code == 0 and "version 2" in allowed.output, allowed.output
    # A name holding checkpoints only takes more without a word.
    again = CliRunner().invoke(main, ["register", run.info.run_id, "seed", "--checkpoint", "latest"])
    assert CliRunner().invoke(main, ["register", run.info.run_id, "seed", "--checkpoint", "latest"]).exit_code == 0
    assert again.exit_code == 0, again.output


def test_download_of_a_sharded_checkpoint_says_to_load_it_from_the_run(
    s3_experiment: str, process_group: None, tmp_path: Path
) -> None:
    from torch.distributed.fsdp import fully_shard

    model = Model(6)
    fully_shard(model)
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(model, epoch=1)
    to = tmp_path / "sharded"
    result = CliRunner().invoke(main, ["download", run.info.run_id, "--to", str(to)])
    assert result.exit_code == 0, result.output
    assert not (to / "checkpoint.pt").exists()
    # Was: nothing, and the help's torch.load(DIR/checkpoint.pt), a file a sharded checkpoint has not.
    hint = result.output.splitlines()[-1]
    assert f"tracking.load('models:/{logged.model_id}')" in hint and "tracking.restore(" in hint, hint
    assert "torch.load(" not in hint and "dcp.json" in hint
    helped = CliRunner().invoke(main, ["download", "--help"])
    assert "sharded" in helped.output and "tracking.restore" in helped.output, helped.output


def test_download_says_which_file_torch_load_reads(s3_run_id: str, tmp_path: Path) -> None:
    for checkpoint, name in (("1", "checkpoint.pt"), ("state_dict", "state_dict.pt")):
        to = tmp_path / checkpoint
        result = CliRunner().invoke(main, ["download", s3_run_id, "--checkpoint", checkpoint, "--to", str(to)])
        assert result.exit_code == 0, result.output
        hint = result.output.splitlines()[-1]
        assert f"torch.load({str(to / name)!r}, weights_only=True)" in hint, hint


def test_show_and_download_of_a_run_without_checkpoints_advise_what_the_run_holds(
    s3_experiment: str, tmp_path: Path
) -> None:
    model = Model(6)
    with mlflow.start_run() as weights:
        tracking.log_state_dict(model)
    with mlflow.start_run() as whole:
        tracking.log_model(model, pip_requirements=["torch"])
    with mlflow.start_run() as empty:
        pass
    pickled = f"tracking.load_pickled_model('{whole.info.run_id}', trust_pickle=True)"
    for run, advised, not_advised in (
        (weights, ["--checkpoint state_dict", f"tracking.load_model('{weights.info.run_id}')"], ["load_pickled"]),
        (whole, [pickled], ["load_model(", "state_dict"]),
        (empty, ["no state dict or whole model", "tracking.log_checkpoint("], ["load_model(", "state_dict"]),
    ):
        run_id = run.info.run_id
        for args in (["show", run_id], ["download", run_id, "--to", str(tmp_path / run_id)]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 1, result.output
            assert "has no committed checkpoints" in result.stderr, result.stderr
            # Was: "load the state dict with tracking.load_model()" whatever the run held, no --checkpoint state_dict.
            assert all(words in result.stderr for words in advised), result.stderr
            assert not any(words in result.stderr for words in not_advised), result.stderr


def test_checkpoints_and_an_epoch_of_a_run_without_checkpoints_advise_what_the_run_holds(s3_experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as weights:
        tracking.log_state_dict(model)
    with mlflow.start_run() as empty:
        pass
    for run, advised in (
        (weights, ["--checkpoint state_dict", f"tracking.load_model('{weights.info.run_id}')"]),
        (empty, ["no state dict or whole model", "tracking.log_checkpoint("]),
    ):
        run_id = run.info.run_id
        listed = CliRunner().invoke(main, ["checkpoints", run_id])
        assert listed.exit_code == 0, listed.output
        # Was: "RUN: no committed checkpoints", and nothing on what of the run loads.
        assert listed.stdout.startswith(f"{run_id}: no committed checkpoints; "), listed.stdout
        assert all(words in listed.stdout for words in advised), listed.stdout
        refused = CliRunner().invoke(main, ["show", run_id, "--checkpoint", "3"])
        assert refused.exit_code == 1, refused.output
        # Was: "committed epochs: none." and no next step.
        assert "no committed checkpoint for epoch 3, nor any other: it holds no checkpoints;" in refused.stderr
        assert all(words in refused.stderr for words in advised), refused.stderr
        with pytest.raises(tracking.NotFoundError, match="at step 5, nor any other: it holds no checkpoints;"):
            tracking.load(run_id, step=5)  # was: "their steps: none. Pass one of those"


def test_an_epoch_the_run_does_not_hold_names_those_it_does_and_the_next_step(s3_run_id: str) -> None:
    refused = CliRunner().invoke(main, ["show", s3_run_id, "--checkpoint", "7"])
    assert refused.exit_code == 1, refused.output
    # Was: "...; committed epochs: 1, 2, 3." and no next step.
    assert "committed epochs: 1, 2, 3. Pass one of those, or checkpoint='latest' | 'best'" in refused.stderr
