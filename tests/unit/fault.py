"""Run a module as ``python -m`` would, but SIGKILL the process halfway through writing one artifact.

    python -m tests.unit.fault checkpoint-epoch-0005/checkpoint.pt pipelines.train --epochs 8

The target is ``<checkpoint name>/<file>`` for a file of a checkpoint's logged model (its
store's root is the model's own artifact location), or a path in the run's artifacts such as
``state_dict/state_dict.pt``. Product code has no test hooks: this wraps the stores' ``write``
from outside, so the kill lands mid-stream, after part of the file went to the store and
before anything after it (the manifest, READY, the run's tags) could be written.
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import IO

from tracking.manifest import StoredFile
from tracking.storage import ArtifactStore, Producer
from tracking.storage.artifact_repo import MlflowStore
from tracking.storage.s3 import S3Store


def is_target(store: ArtifactStore, path: str, target: str) -> bool:
    """Whether writing ``path`` to ``store`` writes ``target``: a run artifact's path, or
    ``<checkpoint name>/<file>`` in the store of that checkpoint's logged model (named in its owner,
    ``run <id>, <checkpoint name> (<model ID>)``)."""
    where, _, name = target.rpartition("/")
    return path == target or (path == name and f", {where} (" in store.owner)


def interrupted(
    original: Callable[..., StoredFile], target: str, then: Callable[[], object]
) -> Callable[..., StoredFile]:
    """A store ``write`` that, for ``target``, sends half of the file's bytes and then calls ``then``
    (which kills the process, or raises what a failing store would)."""

    def write(self: ArtifactStore, path: str, produce: Producer) -> StoredFile:
        if not is_target(self, path, target):
            return original(self, path, produce)

        def half_then(stream: IO[bytes]) -> None:
            buffer = io.BytesIO()
            produce(buffer)
            stream.write(buffer.getbuffer()[: buffer.tell() // 2])
            then()

        return original(self, path, half_then)

    return write


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    target, module, *args = sys.argv[1:]
    for cls in (MlflowStore, S3Store):
        cls.write = interrupted(cls.write, target, _die)  # type: ignore[method-assign]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
