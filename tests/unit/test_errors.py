"""The one rule for how a command line reports an error: exit status and a one-line message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tracking.errors import IntegrityError, NotFoundError, TrackingError, exit_code, one_line


class _Refused(Exception):
    pass


@pytest.mark.parametrize("exc", [TrackingError("x"), NotFoundError("x"), IntegrityError("x")])
def test_tracking_errors_exit_1(exc: BaseException) -> None:
    assert exit_code(exc) == 1


@pytest.mark.parametrize("exc", [ValueError("x"), TypeError("x"), KeyboardInterrupt(), _Refused("x")])
def test_anything_else_is_left_to_propagate(exc: BaseException) -> None:
    assert exit_code(exc) is None


def test_extra_types_exit_1_too() -> None:
    assert exit_code(_Refused("x"), also=(_Refused,)) == 1
    assert exit_code(ValueError("x"), also=(_Refused,)) is None


def test_one_line_collapses_every_run_of_whitespace() -> None:
    exc = NotFoundError("run abc has no checkpoint\n  at epoch 3;\tlog one first.\n")
    assert one_line(exc) == "run abc has no checkpoint at epoch 3; log one first."


def test_the_helper_imports_neither_torch_nor_mlflow() -> None:
    code = "import sys, tracking.errors; print(sorted({'torch', 'mlflow', 'boto3'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_run_command_prints_one_line_and_returns_1_and_lets_other_errors_through(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tracking.errors import NotFoundError, run_command

    def missing() -> None:
        raise NotFoundError("run r: no such\ncheckpoint")

    assert run_command(lambda: None) == 0
    assert run_command(missing) == 1
    assert capsys.readouterr().err == "error: run r: no such checkpoint\n"
    with pytest.raises(KeyError):
        run_command(lambda: {}["x"])


def test_error_lines_of_processes_sharing_stderr_never_run_together(tmp_path: Path) -> None:
    # The ranks of a torchrun job share one unbuffered stderr and often fail at the same moment;
    # ``print`` would write each message and its newline apart, and the lines would run together.
    code = "import sys\nfrom tracking.errors import print_error as e\nfor _ in range(3000): e(sys.argv[1] + 'x' * 300)"
    shared = tmp_path / "stderr"
    with shared.open("ab") as stderr:  # O_APPEND: every write lands whole at the end, as on a pipe
        children = [
            subprocess.Popen([sys.executable, "-u", "-c", code, f"rank{rank} "], stderr=stderr) for rank in range(4)
        ]
        for child in children:
            assert child.wait(timeout=60) == 0
    lines = shared.read_text().splitlines()
    assert sorted(set(lines)) == [f"error: rank{rank} " + "x" * 300 for rank in range(4)]
    assert len(lines) == 4 * 3000


def test_a_commands_warnings_are_one_line_each() -> None:
    """A pipeline (run_command) warns as the CLI does: `warning: <one line>`, not Python's file:line format."""
    code = (
        "import warnings\n"
        "from tracking.errors import run_command\n"
        "before = warnings.formatwarning\n"
        "action = lambda: warnings.warn('the RNG states of 2 GPU(s)\\nand 1 here', RuntimeWarning, stacklevel=2)\n"
        "assert run_command(action) == 0\n"
        "assert warnings.formatwarning is before\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "warning: the RNG states of 2 GPU(s) and 1 here\n"
