"""Run a module as ``python -m`` would, but SIGKILL the process at one chosen phase of a save.

    python -m tests.reliability.crash --when after --op CompleteMultipartUpload --key '/checkpoint\\.pt$' \\
        tests.reliability.workload RUN_ID --epochs 2

The kill point is a call the save makes to a real server, seen from outside the library
(the way tests/unit/fault.py wraps it, with no test hook in product code):

- ``--op`` an S3 operation (``CreateMultipartUpload``, ``UploadPart``, ``CompleteMultipartUpload``,
  ``PutObject``, ``DeleteObject``...), caught where every boto3 client sends its calls, and
  ``--key`` a regular expression its object key must match;
- ``--op tags``: the tracking server request that moves the run's tags (``runs/log-batch`` or
  ``runs/set-tag``), caught where MLflow's REST client sends it;
- ``--op mlflow``: any tracking server request, caught there too, and ``--key`` a regular expression
  its method and path (``PATCH /api/2.0/mlflow/logged-models/m-...``) must match: see
  :data:`CREATE_MODEL`, :data:`FINALIZE_MODEL`, :data:`DELETE_MODEL`.

``--when before`` kills before the request is sent, ``after`` once the server has answered;
``--nth`` picks the Nth matching call. A child that never reaches its kill point exits
normally, and the parent sees that (its exit status is not -9).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

TAG_ENDPOINTS = ("/runs/log-batch", "/runs/set-tag")
# --op mlflow keys: a checkpoint's logged model created (PENDING), finalized (READY or FAILED), deleted.
CREATE_MODEL = r"^POST /api/2\.0/mlflow/logged-models$"
FINALIZE_MODEL = r"^PATCH /api/2\.0/mlflow/logged-models/m-[0-9a-f]+$"
DELETE_MODEL = r"^DELETE /api/2\.0/mlflow/logged-models/m-[0-9a-f]+$"


class KillPoint:
    def __init__(self, when: str, op: str, key: str, nth: int) -> None:
        self.when = when
        self.op = op
        self.key = re.compile(key)
        self.nth = nth
        self.seen = 0
        self.lock = threading.Lock()

    def hit(self, op: str, key: str) -> bool:
        if op != self.op or not self.key.search(key):
            return False
        with self.lock:
            self.seen += 1
            return self.seen == self.nth

    def around(self, call: Callable[[], Any], op: str, key: str) -> Any:
        if not self.hit(op, key):
            return call()
        if self.when == "before":
            die()
        result = call()
        die()
        return result


def die() -> None:
    sys.stderr.write("crash: SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: KillPoint) -> None:
    if point.op in ("tags", "mlflow"):
        import mlflow.utils.rest_utils as rest_utils

        original_request = rest_utils.http_request

        def http_request(host_creds: Any, endpoint: str, method: str, *args: Any, **kwargs: Any) -> Any:
            op = "mlflow" if point.op == "mlflow" else "tags" if endpoint.endswith(TAG_ENDPOINTS) else endpoint
            request = f"{method} {endpoint}"
            return point.around(lambda: original_request(host_creds, endpoint, method, *args, **kwargs), op, request)

        rest_utils.http_request = http_request  # type: ignore[assignment]
        return
    from botocore.client import BaseClient

    original_call = BaseClient._make_api_call

    def make_api_call(self: Any, operation: str, params: dict[str, Any]) -> Any:
        return point.around(lambda: original_call(self, operation, params), operation, str(params.get("Key", "")))

    BaseClient._make_api_call = make_api_call  # type: ignore[method-assign]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.crash")
    parser.add_argument("--when", choices=("before", "after"), required=True)
    parser.add_argument("--op", required=True)
    parser.add_argument(
        "--key", default="", help="regular expression the S3 object key (--op mlflow: 'METHOD /path') must match"
    )
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    install(KillPoint(options.when, options.op, options.key, options.nth))
    sys.argv = [options.module, *options.args]
    runpy.run_module(options.module, run_name="__main__", alter_sys=True)
