"""How a command ends when its arguments, its user or its reader stop it: the status and the one line it prints."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tracking.cli import main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "args",
    [
        ["download", "../x", "--to", "out"],
        ["checkpoints", "a run"],
        ["show", "runs:/a run"],
        ["verify", "--", "--json"],
        ["gc", "1 2", "--keep-last", "1"],
        ["register", "run.1", "seed"],
    ],
)
def test_a_malformed_run_id_is_a_usage_error_saying_what_a_run_id_looks_like(
    tracking_store: str, args: list[str]
) -> None:
    # Was: "error: run ... not found on tracking server ..." and exit 1, as for a run deleted since.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "is not a run ID: a run ID is 32 hex characters" in result.stderr, result.stderr
    assert "models:/<name>@<alias>" in result.stderr and "Traceback" not in result.output


def test_a_malformed_run_id_with_json_prints_the_usage_error_as_json(tracking_store: str) -> None:
    result = CliRunner().invoke(main, ["checkpoints", "a run", "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert (error["exit_code"], error["type"]) == (2, "BadParameter") and "32 hex characters" in error["error"]


def test_a_run_id_mlflow_takes_that_names_no_run_is_not_found_and_says_what_run_ids_look_like(
    tracking_store: str,
) -> None:
    result = CliRunner().invoke(main, ["checkpoints", "not-a-run"])
    assert result.exit_code == 1, result.output
    assert "run not-a-run not found" in result.stderr and "32 hex characters" in result.stderr, result.stderr
    issued = CliRunner().invoke(main, ["checkpoints", "f" * 32])
    assert issued.exit_code == 1 and "32 hex" not in issued.stderr, issued.stderr  # its shape is right
