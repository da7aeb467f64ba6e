"""The suite itself: a signal handler one test changes is the process's own again for the next test.

The two tests run in this order (pytest keeps a file's order): the first leaves SIGINT and SIGTERM ignored, as
Lightning leaves SIGINT once it has caught a Ctrl-C; the second, run after it in the same process, finds them as
the process started and so does the child it starts.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import SIGNAL_HANDLERS_AT_START

SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHILD = "import signal\nprint(*(signal.getsignal(n) == signal.SIG_IGN for n in (signal.SIGINT, signal.SIGTERM)))"


def test_a_test_that_ignores_sigint_and_sigterm() -> None:
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_the_next_test_and_its_child_process_get_the_handlers_back() -> None:
    assert [signal.getsignal(n) for n in SIGNALS] == [SIGNAL_HANDLERS_AT_START[n] for n in SIGNALS]
    # An ignored signal is inherited: a command that Ctrl-C (or a supervisor's SIGTERM) should stop would run on.
    # (Ignored from the start only where pytest itself started so, e.g. as a background job of a script.)
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert child.stdout.split() == [str(SIGNAL_HANDLERS_AT_START[n] == signal.SIG_IGN) for n in SIGNALS], child.stdout
