"""Waiting for the stack's services to answer after a start, watching that none of them exits meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tracking.localstack.datadir import last_line
from tracking.localstack.supervisor import Supervisor


def wait_until_healthy(
    processes: Supervisor,
    checks: Mapping[str, Callable[[], str | None]],
    log_path: Callable[[str], Path],
    timeout: float,
) -> str | None:
    """None once every service's check (name -> its problem, None when healthy) passes; else why not, in one
    sentence naming its log: a service exited or stopped, or ``timeout`` seconds passed."""
    problems: dict[str, str | None] = dict.fromkeys(checks, "not checked yet")
    deadline = time.monotonic() + timeout
    while True:
        for name in checks:
            if problems[name] is None:
                continue
            exit_code = processes.exit_code(name)
            if exit_code is not None:
                log = log_path(name)
                return (
                    f"{name} exited during start (exit code {exit_code}, last log line: {last_line(log)!r}); log: {log}"
                )
            if not processes.started_here(name) and processes.owned_pid(name) is None:
                return f"{name} stopped while waiting for it; log: {log_path(name)}"
            problems[name] = checks[name]()
        pending = {name: problem for name, problem in problems.items() if problem is not None}
        if not pending:
            return None
        if time.monotonic() > deadline:
            name, problem = next(iter(pending.items()))
            log = log_path(name)
            return (
                f"{name} did not become healthy within {timeout:.0f}s ({problem}; last "
                f"error in log: {last_line(log, containing='Error')!r}); log: {log}"
            )
        time.sleep(0.25)
