"""Run a module as ``python -m`` would, but kill the process in, or fail, its Nth write of one file.

    torchrun --standalone --nproc-per-node 2 -m tests.distributed.fault kill shard-00001.distcp 5 pipelines.digits ...

``kill``: write half of the file, then SIGKILL this process (the torchrun job then dies);
``fail``: raise a StorageError instead of storing it. Under torchrun each rank runs the wrapper,
and only the rank that writes the file (``shard-00001.distcp``: rank 1) is hit.
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import IO

from tracking.errors import StorageError
from tracking.manifest import StoredFile
from tracking.storage import ArtifactStore, Producer
from tracking.storage.artifact_repo import MlflowStore
from tracking.storage.s3 import S3Store


def _faulty(original: Callable[..., StoredFile], action: str, target: str, nth: int) -> Callable[..., StoredFile]:
    seen = 0

    def write(self: ArtifactStore, path: str, produce: Producer) -> StoredFile:
        nonlocal seen
        if path != target:
            return original(self, path, produce)
        seen += 1
        if seen != nth:
            return original(self, path, produce)
        if action == "fail":
            raise StorageError(f"{self.owner}: {path}: injected: the upload failed")

        def half_then_die(stream: IO[bytes]) -> None:
            buffer = io.BytesIO()
            produce(buffer)
            stream.write(buffer.getbuffer()[: buffer.tell() // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        return original(self, path, half_then_die)

    return write


if __name__ == "__main__":
    action, target, nth, module, *args = sys.argv[1:]
    assert action in ("kill", "fail"), action
    for cls in (MlflowStore, S3Store):
        cls.write = _faulty(cls.write, action, target, int(nth))  # type: ignore[method-assign]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
