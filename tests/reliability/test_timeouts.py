"""Promise: "A dead or silent endpoint fails in about 30 s by default, never minutes" (as StorageError).

Child processes, side by side, with the library's default timeouts and retries: a save whose S3
server accepts connections and never answers, a load whose tracking server does the same (both
behind a stalling fault proxy), a load whose S3 endpoint refuses connections, a save whose
tracking server does; and two that go silent mid-save, where one deadline per operation
matters: the tracking server once the checkpoint is READY (re-reading the tags, checking the
tag request, marking FAILED used to wait 27 s each), and S3 once a multipart upload's first
part is stored (the part's retry, then the abort, used to wait 31 s each). Each must raise
StorageError within :data:`BOUND_S` seconds of the call; a child still
busy after :data:`CHILD_LIMIT_S` is killed and fails the test.

The same defaults, in this process against a bare socket that never answers, are timed closer:
a silent S3 endpoint fails in 25-40 s, a silent tracking server within 30 s (the unit tier tests
the arithmetic with small configured timeouts; waiting out the defaults belongs here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.reliability import workload
from tests.reliability.proxy import HOST, FaultProxy
from tests.unit.test_timeouts import (  # noqa: F401 (fixtures)
    mlflow_env,
    mlflow_get_run,
    s3_env,
    silent_url,
    store_at,
    timed_failure,
)
from tracking.config import bound_mlflow_requests
from tracking.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 45.0  # "about 30 s", with room for a loaded CI machine
CHILD_LIMIT_S = 75.0
STALL_S = CHILD_LIMIT_S + 20


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _silent_after(proxy: FaultProxy, pattern: str) -> None:
    """Once a request matching ``pattern`` went through, every later request gets no answer."""
    seen = proxy.add(pattern, "stall", times=0)  # counts the matches, faults none

    def watch() -> None:
        deadline = time.monotonic() + CHILD_LIMIT_S
        while not seen.matched and time.monotonic() < deadline:
            time.sleep(0.002)
        proxy.add("", "stall", stall_s=STALL_S, times=None)

    threading.Thread(target=watch, daemon=True).start()


def test_dead_or_silent_endpoints_fail_within_bound(stack: LocalStack, new_run: Callable[[], str]) -> None:
    run_id = new_run()
    workload.log(run_id, 1, hidden=workload.SMALL)
    with FaultProxy(stack.s3_port, "s3") as silent_s3, FaultProxy(stack.mlflow_port, "mlflow") as silent_tracking:
        for proxy in (silent_s3, silent_tracking):
            proxy.add("", "stall", stall_s=STALL_S, times=None)
        dead = f"http://{HOST}:{_dead_port()}"
        failures = _probe(
            run_id,
            {
                "silent S3, save": ("save", {"MLFLOW_S3_ENDPOINT_URL": silent_s3.url}),
                "silent tracking server, load": ("load", {"MLFLOW_TRACKING_URI": silent_tracking.url}),
                "dead S3, load": ("load", {"MLFLOW_S3_ENDPOINT_URL": dead}),
                "dead tracking server, save": ("save", {"MLFLOW_TRACKING_URI": dead}),
            },
        )
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def test_endpoints_silent_mid_save_fail_within_one_bound(stack: LocalStack, new_run: Callable[[], str]) -> None:
    """One deadline per save: the requests after the one that found the server silent share its bound."""
    run_id = new_run()
    workload.log(run_id, 1, hidden=workload.SMALL)
    with FaultProxy(stack.s3_port, "s3") as mid_upload, FaultProxy(stack.mlflow_port, "mlflow") as after_ready:
        # The second part and the abort get no answer: the first part is stored, then S3 is silent.
        mid_upload.add(r"^PUT \S*\?\S*\bpartNumber=2\b", "stall", stall_s=STALL_S, times=None)
        mid_upload.add(r"^DELETE \S*\?uploadId=", "stall", stall_s=STALL_S, times=None)
        _silent_after(after_ready, r"^PATCH /api/2\.0/mlflow/logged-models/m-[0-9a-f]{32}(\?|$)")
        failures = _probe(
            run_id,
            {
                "S3 silent after the first part, save": (
                    "save-big",
                    {"MLFLOW_S3_ENDPOINT_URL": mid_upload.url, "TRACKING_S3_PART_SIZE_MB": "5"},
                ),
                "tracking server silent once READY, save": ("save", {"MLFLOW_TRACKING_URI": after_ready.url}),
            },
        )
        if not after_ready.seen(r"^PATCH /api/2\.0/mlflow/logged-models/"):
            failures.append("the save never marked its checkpoint READY: the case tested nothing")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def _probe(run_id: str, cases: dict[str, tuple[str, dict[str, str]]]) -> list[str]:
    """Run each case's probe in a child process, side by side; what went wrong, case by case."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}  # the defaults
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.probe", what, run_id],
            cwd=ROOT,
            env={**base, **overrides},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (what, overrides) in cases.items()
    }
    failures = []
    deadline = time.monotonic() + CHILD_LIMIT_S
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failures.append(f"{name}: still waiting after {CHILD_LIMIT_S:.0f}s (killed)")
            continue
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            failures.append(f"{name}: the probe failed (exit {proc.returncode}): {err[-2000:]}")
            continue
        result = json.loads(lines[-1])
        print(f"{name}: {result['elapsed']:.1f} s")
        if result["error"] is None:
            failures.append(f"{name}: the call succeeded against an endpoint that cannot answer")
        elif not result["storage_error"]:
            failures.append(f"{name}: raised {result['error']}, not StorageError: {result['message']}")
        if result["elapsed"] > BOUND_S:
            failures.append(f"{name}: took {result['elapsed']:.0f}s to fail (bound {BOUND_S:.0f}s)")
    return failures


def test_silent_endpoints_fail_in_about_30_s_by_default(
    s3_env: pytest.MonkeyPatch,  # noqa: F811
    mlflow_env: pytest.MonkeyPatch,  # noqa: F811
    silent_url: str,  # noqa: F811
) -> None:
    bound_mlflow_requests()
    with ThreadPoolExecutor(2) as pool:  # side by side: one wait of about 30 s, not two
        s3 = pool.submit(timed_failure, lambda: store_at(silent_url).read("f"))
        tracking = pool.submit(mlflow_get_run, silent_url)
        (s3_elapsed, s3_error), (tracking_elapsed, _) = s3.result(), tracking.result()
    print(f"silent S3 endpoint, defaults: {s3_elapsed:.1f} s; silent tracking server: {tracking_elapsed:.1f} s")
    assert 25 < s3_elapsed < 40 and "did not answer in time" in str(s3_error)
    assert tracking_elapsed < 30
