"""Promise: "A dead or silent endpoint fails in about 30 s by default, never minutes" (as StorageError).

Four child processes, side by side, with the library's default timeouts and retries: a save
whose S3 server accepts connections and never answers, a load whose tracking server does the
same (both behind a stalling fault proxy), a load whose S3 endpoint refuses connections, and a
save whose tracking server does. Each must raise StorageError within :data:`BOUND_S` seconds of
the call; a child still busy after :data:`CHILD_LIMIT_S` is killed and fails the test.

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


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def test_dead_or_silent_endpoints_fail_within_bound(stack: LocalStack, new_run: Callable[[], str]) -> None:
    run_id = new_run()
    workload.log(run_id, 1, hidden=workload.SMALL)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}  # the defaults
    with FaultProxy(stack.s3_port, "s3") as silent_s3, FaultProxy(stack.mlflow_port, "mlflow") as silent_tracking:
        for proxy in (silent_s3, silent_tracking):
            proxy.add("", "stall", stall_s=CHILD_LIMIT_S + 20, times=None)
        dead = f"http://{HOST}:{_dead_port()}"
        cases = {
            "silent S3, save": ("save", {"MLFLOW_S3_ENDPOINT_URL": silent_s3.url}),
            "silent tracking server, load": ("load", {"MLFLOW_TRACKING_URI": silent_tracking.url}),
            "dead S3, load": ("load", {"MLFLOW_S3_ENDPOINT_URL": dead}),
            "dead tracking server, save": ("save", {"MLFLOW_TRACKING_URI": dead}),
        }
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
            if result["error"] is None:
                failures.append(f"{name}: the call succeeded against an endpoint that cannot answer")
            elif not result["storage_error"]:
                failures.append(f"{name}: raised {result['error']}, not StorageError: {result['message']}")
            if result["elapsed"] > BOUND_S:
                failures.append(f"{name}: took {result['elapsed']:.0f}s to fail (bound {BOUND_S:.0f}s)")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


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
