"""Checking what a run has stored against its manifests, without rebuilding anything."""

from __future__ import annotations

from tracking import layout
from tracking.config import TrackingConfig
from tracking.errors import IntegrityError, NotFoundError
from tracking.run import open_run
from tracking.selection import resolve_run_id


def verify(source: str, *, config: TrackingConfig | None = None) -> dict[str, str | None]:
    """Check every stored file of a run against its manifest: path -> None if intact, else the problem."""
    handle = open_run(resolve_run_id(source, config), config)
    store = handle.store
    folders = [layout.checkpoint_dir(epoch) for epoch in layout.committed_epochs(store)]
    if layout.MANIFEST_FILE in store.list_files(layout.STATE_DICT_DIR):
        folders.insert(0, layout.STATE_DICT_DIR)
    report: dict[str, str | None] = {}
    for folder in folders:
        try:
            manifest = layout.read_manifest(store, folder)
            for name, expected in manifest.files.items():
                path = f"{folder}/{name}"
                try:
                    store.read(path, expected)
                    report[path] = None
                except (IntegrityError, NotFoundError) as exc:
                    report[path] = str(exc)
        except IntegrityError as exc:
            report[layout.manifest_path(folder)] = str(exc)
    return report
