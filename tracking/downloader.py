"""Downloading: a logged checkpoint's files and manifest into a local folder, each checked against its sha256.

What framework integrations hand to their own resume (Lightning's ``ckpt_path``, the Hugging Face
Trainer's ``resume_from_checkpoint``), and what ``tracking download`` writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracking.config import TrackingConfig
from tracking.errors import ConfigError
from tracking.manifest import StoredFile
from tracking.output import human_size
from tracking.selection import Located, Selector, find_checkpoint
from tracking.storage import Buffer

# Reads one file of a located checkpoint, sha256-checked: (located, name, expected) -> its bytes.
Reader = Callable[[Located, str, StoredFile], Buffer]


def download(
    source: str,
    checkpoint: Selector = "latest",
    *,
    to: str | os.PathLike[str],
    force: bool = False,
    config: TrackingConfig | None = None,
) -> Path:
    """Download a checkpoint's files and its manifest into the folder ``to``; returns it.

    ``source`` and ``checkpoint`` name the checkpoint as in :func:`tracking.load` (a run ID with
    ``"latest"``, ``"best"`` or an epoch; ``models:/...``). Every file is checked against its
    sha256 before it is moved into place: a failure leaves no partial file in ``to``.
    """
    return download_files(find_checkpoint(source, checkpoint, config=config), Path(to), force=force)


def download_files(located: Located, to: Path, *, force: bool = False, read: Reader | None = None) -> Path:
    """Write ``located``'s files and manifest into ``to`` (see :func:`download`)."""
    names = [*located.manifest.files, "manifest.json"]
    existing = [name for name in names if (to / name).exists()]
    if existing and not force:
        raise ConfigError(f"{to}: {', '.join(existing)} exist already; pass force=True (--force) to overwrite.")
    read = read or _read
    created = not to.exists()
    # Every file goes to a folder of its own inside `to` first and is moved into place only once all
    # are written: a full or read-only disk, or a failed read, leaves no partial file behind.
    staging: Path | None = None
    try:
        to.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=to))
        for name, expected in located.manifest.files.items():
            (staging / name).write_bytes(read(located, name, expected))
        (staging / "manifest.json").write_bytes(located.manifest.to_json())
        for name in names:
            os.replace(staging / name, to / name)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {_what_failed(exc, to)} ({exc.strerror or exc}); nothing was downloaded: pass a "
            f"writable folder with room for {human_size(sum(f.size for f in located.manifest.files.values()))}."
        ) from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created and to.is_dir() and not any(to.iterdir()):
            to.rmdir()
    return to


def _read(located: Located, name: str, expected: StoredFile) -> Any:
    return located.read(name)


def _what_failed(exc: OSError, to: Path) -> Path:
    """The path an OSError names, as the user knows it (a staged file by its place in ``to``)."""
    if not isinstance(exc.filename, str):
        return to
    failed = Path(exc.filename)
    if failed.name.startswith(".download-"):
        return to
    return to / failed.name if failed.parent.name.startswith(".download-") else failed
