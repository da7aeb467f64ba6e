"""Downloading: a logged checkpoint's files and manifest into a local folder, each checked against its sha256.

What framework integrations hand to their own resume (Lightning's ``ckpt_path``, the Hugging Face
Trainer's ``resume_from_checkpoint``), and what ``tracking download`` writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracking import layout
from tracking.config import TrackingConfig
from tracking.errors import ConfigError, TrackingError
from tracking.located import Located
from tracking.manifest import Manifest, StoredFile
from tracking.output import agree, human_size
from tracking.selection import Selector, find_checkpoint
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
    sha256 before it is moved into place: a failure leaves ``to`` as it was. With ``force``, the
    files a previous download into ``to`` wrote (its manifest.json lists them) that this checkpoint
    lacks are removed: the folder holds one checkpoint; files no manifest of ours lists stay.
    """
    return download_files(find_checkpoint(source, checkpoint, config=config), Path(to), force=force).to


@dataclass(frozen=True)
class Downloaded:
    """What a download left beside the checkpoint's files in its folder ``to``.

    ``removed``: files that the manifest.json it replaced listed and this checkpoint has not (a
    previous download's, gone so that the folder holds one checkpoint); ``kept``: everything else
    that was there, which no manifest of ours listed, untouched.
    """

    to: Path
    removed: list[str]
    kept: list[str]


def download_files(located: Located, to: Path, *, force: bool = False, read: Reader | None = None) -> Downloaded:
    """Write ``located``'s files and manifest into ``to`` (see :func:`download`)."""
    names = [*located.manifest.files, layout.MANIFEST_FILE]
    existing = [name for name in names if (to / name).exists()]
    if existing and not force:
        exist = agree(len(existing), "exists", "exist")
        raise ConfigError(f"{to}: {', '.join(existing)} {exist} already; pass force=True (--force) to overwrite.")
    read = read or _read
    created = not to.exists()
    # Every file goes to a folder of its own inside `to` first and is moved into place only once all
    # are written: a full or read-only disk, or a failed read, leaves no partial file behind.
    staging: Path | None = None
    swap = _Swap(to)
    try:
        to.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=to))
        for name, expected in located.manifest.files.items():
            (staging / name).write_bytes(read(located, name, expected))
        (staging / layout.MANIFEST_FILE).write_bytes(located.manifest.to_json())
        stale = [name for name in _listed_in(to) if name not in names and _is_plain_file(to / name)]
        swap.run(staging, names, stale)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {_what_failed(exc, to)} ({exc.strerror or exc}); {swap.outcome()}: pass a writable "
            f"folder with room for {human_size(sum(f.size for f in located.manifest.files.values()))}."
        ) from exc
    finally:
        if staging is not None and not swap.stranded:
            shutil.rmtree(staging, ignore_errors=True)
        if created and to.is_dir() and not any(to.iterdir()):
            to.rmdir()
    kept = sorted(p.name for p in to.iterdir() if p.name not in names and not p.name.startswith(_STAGING_PREFIX))
    return Downloaded(to, stale, kept)


_STAGING_PREFIX = ".download-"


class _Swap:
    """Moves staged files into a folder, setting aside first what they replace and the stale files; puts
    everything back if a move fails, so a failed download leaves the folder as it was."""

    def __init__(self, to: Path) -> None:
        self.to = to
        self.set_aside: list[str] = []
        self.placed: list[str] = []
        self.stranded: Path | None = None  # where set-aside files stay when putting them back failed

    def run(self, staging: Path, names: list[str], stale: list[str]) -> None:
        aside = staging / ".previous"
        aside.mkdir()
        try:
            for name in [*stale, *names]:
                if _is_plain_file(self.to / name):
                    os.replace(self.to / name, aside / name)
                    self.set_aside.append(name)
            for name in names:  # the manifest last: a folder never holds a manifest of files it lacks
                os.replace(staging / name, self.to / name)
                self.placed.append(name)
        except BaseException:
            # Ctrl-C too: the caller then removes the staging folder, and the set-aside files with it.
            self._put_back(aside)
            raise

    def _put_back(self, aside: Path) -> None:
        try:
            for name in self.placed:
                (self.to / name).unlink()
            for name in self.set_aside:
                os.replace(aside / name, self.to / name)
        except OSError:
            self.stranded = aside

    def outcome(self) -> str:
        """What the folder holds after a failure, for the error message."""
        if self.stranded is not None:
            return f"{self.to} is part-written, and the files it held before are in {self.stranded}"
        return "nothing was downloaded" if not self.set_aside else f"{self.to} is as it was"


def _listed_in(to: Path) -> list[str]:
    """The files the manifest.json in ``to`` lists (what a previous download wrote); none unless it is one of ours."""
    path = to / layout.MANIFEST_FILE
    if not _is_plain_file(path):
        return []
    try:
        return list(Manifest.from_json(path.read_bytes(), where=str(path)).files)
    except (OSError, TrackingError):
        return []  # not a manifest we wrote: nothing in the folder is known to be ours


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _read(located: Located, name: str, expected: StoredFile) -> Any:
    return located.read(name)


def _what_failed(exc: OSError, to: Path) -> Path:
    """The path an OSError names, as the user knows it (a staged file by its place in ``to``)."""
    if not isinstance(exc.filename, str):
        return to
    failed = Path(exc.filename)
    if failed.name.startswith(_STAGING_PREFIX):
        return to
    staged = failed.parent.name.startswith(_STAGING_PREFIX) or failed.parent.name == ".previous"
    return to / failed.name if staged else failed
