"""Background servers started by name and found again later, from another process, through pid files.

Nothing here knows which servers the local stack runs: :mod:`tracking.localstack.stack` says what
to start; this module starts, recognises and stops it. For each name it keeps, in ``run_dir``::

    <name>.pid        the pid it started
    <name>.cmdline    that process's command line

A pid counts as ours only while the process behind it still runs the recorded command line: pids
are reused, and a stale pid file must never get another program signalled.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path


class SpawnError(Exception):
    """The program could not be started (``Popen``'s ``OSError``, as its message); nothing was recorded."""


class StillRunning(Exception):
    """Processes left alive even after SIGKILL, as ``name (pid N)`` in the message; their pid files stay."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        super().__init__(", ".join(f"{name} (pid {pid})" for name, pid in pids.items()))
        self.pids = dict(pids)


class Supervisor:
    """Starts, recognises and stops named background processes, recorded in ``run_dir``.

    Each process runs in ``cwd``, in its own session (so its own process group), with its
    output appended to the log file given to :meth:`spawn`.
    """

    def __init__(self, run_dir: Path, cwd: Path) -> None:
        self.run_dir = run_dir
        self.cwd = cwd
        # Only the processes this object started: they must be waited for, or they stay zombies.
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def recorded_pid(self, name: str) -> int | None:
        """The pid in the pid file, whether or not that process still runs."""
        return _read_pid(self._pid_file(name))

    def owned_pid(self, name: str) -> int | None:
        """The pid in the pid file if that process is alive and runs the command we started."""
        pid = self.recorded_pid(name)
        if pid is None:
            return None
        self._reap(name, pid)
        try:
            expected = self._cmdline_file(name).read_text()
        except FileNotFoundError:
            return None
        return pid if _cmdline(pid) == expected else None

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        """Start ``argv`` in the background and record it under ``name``.

        Raises :class:`SpawnError` when the program cannot be started.
        """
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} starting: {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=self.cwd,  # so any relative default (./mlruns, ./mlartifacts) stays inside
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Own process group: `stop` signals the server and its workers together, and
                    # a Ctrl-C in the shell that started it does not reach them.
                    start_new_session=True,
                )
            except OSError as exc:
                raise SpawnError(str(exc)) from None
        self._procs[name] = proc
        self._cmdline_file(name).write_text(" ".join(argv))
        self._pid_file(name).write_text(f"{proc.pid}\n")

    def started_here(self, name: str) -> bool:
        """True when this object started ``name`` (and has not stopped it since)."""
        return name in self._procs

    def exit_code(self, name: str) -> int | None:
        """The exit code of ``name`` if this object started it and it has exited; else None."""
        proc = self._procs.get(name)
        return None if proc is None else proc.poll()

    def stop(self, names: Iterable[str], timeout: float) -> list[str]:
        """SIGTERM the given processes together, SIGKILL what is left after ``timeout`` seconds.

        Returns the names that were running. Each was started as the leader of its own process
        group, so signalling the group also reaches its workers (uvicorn under ``mlflow server``).
        Pid files of the stopped (and of the already gone) are removed; raises
        :class:`StillRunning` when some survive even SIGKILL.
        """
        names = list(names)
        targets: dict[str, tuple[int, bool]] = {}
        for name in names:
            pid = self.owned_pid(name)
            if pid is not None:
                try:
                    targets[name] = (pid, os.getpgid(pid) == pid)
                except ProcessLookupError:
                    pass
        stopped = list(targets)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for pid, group in targets.values():
                _signal(pid, group, sig)
            deadline = time.monotonic() + wait
            while targets and time.monotonic() < deadline:
                for name, (pid, group) in list(targets.items()):
                    self._reap(name, pid)
                    if not _signal(pid, group, 0):
                        del targets[name]
                if targets:
                    time.sleep(0.1)
            if not targets:
                break
        for name in names:
            if name not in targets:
                for path in (self._pid_file(name), self._cmdline_file(name)):
                    path.unlink(missing_ok=True)
                self._procs.pop(name, None)
        if targets:
            raise StillRunning({name: pid for name, (pid, _) in targets.items()})
        return stopped

    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _cmdline_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.cmdline"

    def _reap(self, name: str, pid: int) -> None:
        # A process started by this Python process stays a zombie (and "exists") until waited for.
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:
            proc.poll()
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def port_free(host: str, port: int) -> bool:
    """True when a new listener could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port with only TIME_WAIT leftovers is free for a new listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    # NotADirectoryError: a file stands where the run folder should be, so no pid file is there either.
    except (FileNotFoundError, NotADirectoryError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str | None:
    """The process's arguments joined by spaces, or None when it is gone (or a zombie)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            raw = proc.read_bytes()
        except OSError:
            return None
        return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or None
    result = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _signal(pid: int, group: bool, sig: int) -> bool:
    """Send ``sig`` (0: only check) to the process or its group; False when none of it is left."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, but no longer ours to signal
    return True
