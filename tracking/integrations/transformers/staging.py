"""Staging: a save's files linked into a private folder, so that the Trainer's rotation cannot take them mid-upload."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tracking import layout
from tracking.errors import TrackingError

# Where the files of a save wait for their upload, inside output_dir: the Trainer's rotation only
# looks at checkpoint-* folders.
STAGING = ".tracking-staging"
# The manifest's rule for a stored file name (tracking.manifest): plain names, no folders.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def stage(folder: Path, root: Path, run_id: str, received: Mapping[str, bytes] | None = None) -> Path:
    """A private folder holding ``folder``'s files as hard links (copies where links fail), and ``received``.

    The Trainer's rotation may delete ``folder`` while its upload runs; the links keep the bytes.
    ``received`` (name -> bytes) are the files other ranks wrote, as they sent them: written in
    place of a file of the same name in ``folder``.
    """
    received = received or {}
    for name in received:
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"run {run_id}: a received file is named {name!r}, not a plain file name")
    for entry in folder.iterdir():
        if entry.name == layout.MANIFEST_FILE:
            continue
        if not entry.is_file():
            raise TrackingError(
                f"run {run_id}: {entry} is not a plain file; TrackingCallback logs flat checkpoint folders "
                "(one process's model, optimizer and scheduler files), not sharded states (DeepSpeed, FSDP)."
            )
        if not _FILE_NAME.fullmatch(entry.name):
            raise TrackingError(
                f"run {run_id}: {entry} has a name a manifest cannot list (letters, digits, '.', '_' and '-' only); "
                "rename what writes it."
            )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=root))
    try:
        for entry in folder.iterdir():
            # A folder materialised from a run holds its manifest: the commit writes its own. A received
            # file is what its rank wrote, whatever this disk holds under its name.
            if entry.name == layout.MANIFEST_FILE or entry.name in received:
                continue
            try:
                os.link(entry, staging / entry.name)
            except OSError:
                shutil.copy2(entry, staging / entry.name)
        for name, data in received.items():
            (staging / name).write_bytes(data)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def clear(root: Path) -> None:
    """Remove the staging folder ``root`` and what it holds: called before a training stages anything, when
    what is left there is a killed process's uploads, whose links would keep the bytes of checkpoints the
    Trainer rotated out on disk for good."""
    shutil.rmtree(root, ignore_errors=True)


def drop_if_empty(root: Path) -> None:
    """Remove the staging folder ``root`` once every upload is done, so that output_dir holds the Trainer's
    folders alone."""
    try:
        root.rmdir()
    except OSError:
        pass  # absent, or an upload still holds files there
