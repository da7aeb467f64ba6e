"""The Trainer's rotation, mirrored: a logged model whose checkpoint folder the Trainer deleted is deleted too.

``save_total_limit`` (keeping the best checkpoint of ``metric_for_best_model``) decides which folders
stay; this follows it on the run, moving the best tag first when its checkpoint goes, and keeping a
checkpoint a registry version points at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tracking import catalog, layout, note, registry
from tracking.catalog import LoggedCheckpoint
from tracking.errors import TrackingError, one_line
from tracking.integrations.transformers.description import FORMAT
from tracking.integrations.transformers.folders import PREFIX
from tracking.run import RunHandle

_log = logging.getLogger(__name__)


@dataclass
class _Logged:
    """A checkpoint of the run whose folder this callback mirrors."""

    model_id: str
    artifact_uri: str
    key: int
    keyed_by: str
    metrics: dict[str, float]


class RotationMirror:
    """The run's checkpoints by the folder each was logged from, and every committed checkpoint by its key
    (its epoch, or its global step in a run keyed by step)."""

    def __init__(self) -> None:
        # checkpoint folder -> the logged model of its files; key -> every committed checkpoint of the run.
        self._mirrored: dict[Path, _Logged] = {}
        self._noted: dict[int, note.NotedCheckpoint] = {}

    def load(self, handle: RunHandle, output_dir: Path) -> None:
        """The run's committed checkpoints; those whose folder is in ``output_dir`` are mirrored from now on.

        A resumed training's Trainer rotates the folders it finds (the one materialised from the
        run among them), so their logged models follow the same rule as the ones logged here.
        """
        mirrored: dict[Path, _Logged] = {}
        noted: dict[int, note.NotedCheckpoint] = {}
        for key, stored in catalog.committed(handle).items():
            noted[key] = note.NotedCheckpoint(stored.model_id, stored.metrics)
            try:
                manifest = stored.read_manifest()
            except TrackingError:
                continue  # deleted since the search, or damaged: not ours to manage
            if manifest.format != FORMAT or manifest.step is None:
                continue
            folder = output_dir / f"{PREFIX}-{manifest.step}"
            if folder.is_dir():
                mirrored[folder.resolve()] = _Logged(
                    stored.model_id, stored.artifact_uri, key, stored.keyed_by, stored.metrics
                )
        self._mirrored, self._noted = mirrored, noted

    def surviving(self) -> dict[int, note.NotedCheckpoint]:
        """The run's committed checkpoints by key, less those whose folder the Trainer rotated out."""
        gone = {m.key for folder, m in self._mirrored.items() if not folder.is_dir()}
        return {k: c for k, c in self._noted.items() if k not in gone}

    def committed(
        self, handle: RunHandle, folder: Path, logged: LoggedCheckpoint, monitor: str | None, mode: str
    ) -> None:
        """Record the checkpoint just committed, then delete the logged models whose folder the Trainer rotated out."""
        key, keyed_by = logged.manifest.key, logged.manifest.keyed_by
        assert key is not None and logged.model_id is not None and logged.artifact_uri is not None
        # A re-logged key replaced its earlier logged model (the commit deleted it).
        self._mirrored = {f: m for f, m in self._mirrored.items() if m.key != key}
        metrics = dict(logged.manifest.metrics)
        self._mirrored[folder] = _Logged(logged.model_id, logged.artifact_uri, key, keyed_by, metrics)
        self._noted[key] = note.NotedCheckpoint(logged.model_id, metrics)
        gone = {f: m for f, m in self._mirrored.items() if not f.is_dir()}
        if not gone:
            return
        try:
            handle.refresh_tags()
            registered = registry.versions_by_model(handle)
        except TrackingError as exc:
            _log.warning(
                "run %s: could not check the run before deleting %d checkpoint(s) the Trainer rotated out (%s); "
                "the next save retries.",
                handle.run_id,
                len(gone),
                one_line(exc)[:300],
            )
            return
        for folder_gone, doomed in sorted(gone.items(), key=lambda item: item[1].key):
            if doomed.model_id == handle.tags.get(layout.TAG_LATEST):
                # Still the run's latest: the save that rotated it out is uploading next, and its pass deletes it.
                continue
            if doomed.model_id in registered:
                _log.warning(
                    "run %s: the Trainer deleted %s, but its checkpoint (%s, %s) is kept because registry "
                    "version %s points at it.",
                    handle.run_id,
                    folder_gone.name,
                    layout.label(doomed.keyed_by, doomed.key),
                    doomed.model_id,
                    ", ".join(registered[doomed.model_id]),
                )
                del self._mirrored[folder_gone]
                continue
            try:
                if monitor is not None and handle.tags.get(layout.TAG_BEST) == doomed.model_id:
                    self._repoint_best(handle, doomed, monitor, mode)
                catalog.delete(handle, doomed.model_id, doomed.artifact_uri)
            except TrackingError as exc:
                _log.warning(
                    "run %s: could not delete checkpoint %s (%s), whose folder the Trainer rotated out "
                    "(%s); the next save retries.",
                    handle.run_id,
                    doomed.model_id,
                    layout.label(doomed.keyed_by, doomed.key),
                    one_line(exc)[:300],
                )
                continue
            del self._mirrored[folder_gone]
            self._noted.pop(doomed.key, None)

    def _repoint_best(self, handle: RunHandle, doomed: _Logged, monitor: str, mode: str) -> None:
        """Point the best tag at the best checkpoint still mirrored, before the one it names goes."""
        survivors = {
            m.key: m for f, m in self._mirrored.items() if f.is_dir() and m is not doomed and monitor in m.metrics
        }
        ranked = layout.best_first({k: m.metrics[monitor] for k, m in survivors.items()}, mode)
        if ranked:
            best = survivors[ranked[0]]
            handle.set_tags(
                {
                    layout.TAG_BEST: best.model_id,
                    layout.TAG_BEST_VALUE: repr(best.metrics[monitor]),
                    layout.TAG_MONITOR: monitor,
                    layout.TAG_MODE: mode,
                }
            )
