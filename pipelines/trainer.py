"""Who trains a run: the process that records itself in the run's tag ``tracking.trainer`` as it starts training
it, and whether that process still runs.

A run killed with ``kill -9``, or by a power loss, stays RUNNING in MLflow: its status alone cannot tell a dead
training from one that goes on. The tag can, on the host that trained it: it holds the host, the process ID and
the process's start (the boot and the clock ticks since, from ``/proc``), so that a process ID the system has
given to another process since is not taken for the training. Under torchrun rank 0 records it, as it alone
starts the run. :func:`pipelines.resume.check_trainer` reads it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tracking.errors import TrackingError

TAG_TRAINER = "tracking.trainer"


class RunInUseError(TrackingError):
    """A run's training still runs on this host: resuming it in place now would train it twice (exit status 2)."""


@dataclass(frozen=True)
class Trainer:
    """A process that trains a run, as its tag records it."""

    host: str
    pid: int
    # The process's start: "<boot ID>:<clock ticks since boot>"; None where the system does not tell (no /proc).
    started: str | None
    since: str  # when it began training the run, UTC, for the people who read the tag

    @classmethod
    def this_process(cls) -> Trainer:
        pid = os.getpid()
        since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return cls(socket.gethostname(), pid, process_start(pid), since)

    @classmethod
    def read(cls, tags: dict[str, str]) -> Trainer | None:
        """The trainer a run's ``tags`` record; None when they record none (a run from before the tag, or one no
        pipeline trained) or one edited out of shape."""
        try:
            fields = json.loads(tags[TAG_TRAINER])
            return cls(str(fields["host"]), int(fields["pid"]), fields.get("started"), str(fields.get("since", "?")))
        except (KeyError, ValueError, TypeError):
            return None

    def tag(self) -> dict[str, str]:
        return {TAG_TRAINER: json.dumps(asdict(self), sort_keys=True)}

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether this process still runs: on this host, with the same ID and the same start."""
        return self.on_this_host() and self.started is not None and process_start(self.pid) == self.started

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host} (since {self.since})"


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as ``<boot ID>:<clock ticks since boot>``; None when it does not run, or the
    system has no ``/proc`` to tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # Field 22, counted after the command's name, which is in parentheses and may hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None
