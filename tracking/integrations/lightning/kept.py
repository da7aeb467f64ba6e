"""The checkpoints a trainer keeps: which local files Lightning wrote are which logged model of the run.

``ModelCheckpoint`` names its files, overwrites them (``last.ckpt``) and removes them (``save_top_k``);
the run knows logged models, one a key (an epoch, or a global step for a fit that saves by step).
This is the map between the two, the deletion of a logged model once no kept file is it any more
(after moving the run's latest/best tag to a survivor), and the tag on each model listing its
files, by which a resumed run's trainer finds the models of the files it removes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tracking import catalog, layout, note
from tracking.catalog import LoggedCheckpoint
from tracking.errors import TrackingError, one_line
from tracking.integrations.lightning.description import weights_only
from tracking.manifest import Manifest
from tracking.run import RunHandle, tracking_server_errors

_log = logging.getLogger(__name__)

# The logged model tag listing the local files (paths Lightning wrote) that are this checkpoint: a
# resumed run's ModelCheckpoint removes files of the run before it, and this says which model each is.
TAG_PATHS = "tracking.lightning.paths"


@dataclass
class Kept:
    """A committed checkpoint of this trainer: its model, the local paths that are it, its epoch, step and
    metrics. Its ``key`` is its epoch, or its global step when ``keyed_by`` is ``"step"``."""

    model_id: str
    artifact_uri: str
    keyed_by: str
    epoch: int
    step: int
    metrics: dict[str, float]
    paths: set[str]
    # Saved by ModelCheckpoint(save_weights_only=True): a full save of the same epoch and step takes its place.
    weights_only: bool = False

    @property
    def key(self) -> int:
        return self.step if self.keyed_by == layout.STEP else self.epoch


class KeptCheckpoints:
    """The committed checkpoints of one trainer by the local files that are them, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, Kept] = {}  # model ID -> what this trainer keeps
        self._by_path: dict[str, str] = {}  # local path -> model ID
        self._removed_early: set[str] = set()  # removed before their commit (Lightning's AsyncCheckpointIO)
        self._pending: dict[tuple[int, int], list[str]] = {}  # (epoch, step) uploading -> paths that are it too
        self._pending_weights_only: set[tuple[int, int]] = set()  # those of them that hold the weights alone
        self._logged: list[LoggedCheckpoint] = []
        self._tagging: list[Future[None]] = []  # path tags under way

    # --- a resumed run -------------------------------------------------------------------------

    def seed(self, handle: RunHandle) -> None:
        """A resumed run's checkpoints, by the local paths that are them: its ModelCheckpoint may remove them.

        One search (paged), which brings each model's tags: no request per checkpoint.
        """
        committed = {c.model_id: c for c in catalog.committed(handle).values()}
        if not committed:
            return
        token = None
        while True:
            with tracking_server_errors(handle.run_id, "listing the run's checkpoints"):
                page = handle.client.search_logged_models(
                    experiment_ids=[handle.experiment_id],
                    filter_string=f"source_run_id = '{handle.run_id}'",
                    max_results=100,
                    page_token=token,
                )
            for model in page:
                stored = committed.get(model.model_id)
                raw = (model.tags or {}).get(TAG_PATHS)
                if stored is None or stored.key is None or stored.epoch is None or not raw:
                    continue
                try:
                    paths = {str(p) for p in json.loads(raw)}
                    step = int((model.params or {}).get(layout.PARAM_STEP, "0"))
                except (ValueError, TypeError):
                    continue  # a tag edited by hand: that checkpoint is left to `tracking gc`
                with self._lock:
                    self._kept[stored.model_id] = Kept(
                        stored.model_id,
                        stored.artifact_uri,
                        stored.keyed_by,
                        stored.epoch,
                        step,
                        dict(stored.metrics),
                        paths,
                    )
                    for path in paths:
                        self._by_path[path] = stored.model_id
            token = page.token
            if not token:
                return

    # --- saves and commits ---------------------------------------------------------------------

    def begin(self, epoch: int, step: int, weights_only: bool = False) -> None:
        """The checkpoint of ``epoch`` and ``step`` is being committed: saves of it meanwhile go along."""
        with self._lock:
            self._pending[(epoch, step)] = []
            if weights_only:
                self._pending_weights_only.add((epoch, step))

    def abandon(self, epoch: int, step: int) -> None:
        """The commit of ``epoch`` and ``step`` will not be made."""
        with self._lock:
            self._pending.pop((epoch, step), None)
            self._pending_weights_only.discard((epoch, step))

    def uploading_weights_only(self, epoch: int, step: int) -> bool:
        """Whether the checkpoint of ``epoch`` and ``step`` being committed holds the weights alone."""
        with self._lock:
            return (epoch, step) in self._pending_weights_only

    def alias(
        self, path: str, epoch: int, step: int, weights_only: bool = False
    ) -> tuple[str | None, str | None] | None:
        """The model already committed for this epoch and step (``last.ckpt`` after the top-k file), if any,
        and the model ``path`` was before (the file is overwritten), if another. (None, None) when that
        checkpoint's upload is still under way: its commit takes ``path`` along. None too when the model of this
        epoch and step holds the weights alone and ``path`` (not ``weights_only``) the whole training state: a
        ModelCheckpoint(save_weights_only=True) saved first, and this file, which a fit resumes from, replaces it."""
        with self._lock:
            if (epoch, step) in self._pending:
                self._pending[(epoch, step)].append(path)
                return None, None
            for model_id, kept in self._kept.items():
                if kept.epoch == epoch and kept.step == step:
                    if kept.weights_only and not weights_only:
                        return None
                    previous = self._by_path.get(path)
                    kept.paths.add(path)
                    self._by_path[path] = model_id
                    return model_id, (previous if previous != model_id else None)
        return None

    def note_path(self, handle: RunHandle, model_id: str, path: str, previous: str | None) -> None:
        """``path`` is ``model_id`` too now; the model it was before goes when no other file is it."""
        with self._lock:
            paths = set(self._kept[model_id].paths) if model_id in self._kept else {path}
        self.tag_paths(handle, model_id, paths)
        if previous is not None:
            self.release(handle, previous, path)

    def record(self, handle: RunHandle, logged: LoggedCheckpoint, manifest: Manifest, path: str) -> set[str]:
        """Keep the checkpoint just committed from ``path`` (and the files saved as it while it uploaded);
        returns those of its files that ModelCheckpoint removed before the commit ran."""
        assert manifest.key is not None and manifest.epoch is not None and manifest.step is not None
        assert logged.model_id is not None and logged.artifact_uri is not None
        with self._lock:
            # The commit replaced any other model of this key (a re-log, in the core's terms). The weights alone
            # of this very save, which it replaced, stay its files: they are this checkpoint's weights.
            same_save: set[str] = set()
            for model_id in [m for m, kept in self._kept.items() if kept.key == manifest.key]:
                replaced = self._kept.pop(model_id)
                if replaced.weights_only and (replaced.epoch, replaced.step) == (manifest.epoch, manifest.step):
                    same_save |= replaced.paths
                for stale in replaced.paths:
                    self._by_path.pop(stale, None)
            # This file, and those saved as the same epoch and step while it uploaded (last.ckpt).
            paths = {path, *same_save, *self._pending.pop((manifest.epoch, manifest.step), [])}
            self._pending_weights_only.discard((manifest.epoch, manifest.step))
            overwritten = [(self._by_path[p], p) for p in paths if p in self._by_path]
            self._kept[logged.model_id] = Kept(
                logged.model_id,
                logged.artifact_uri,
                manifest.keyed_by,
                manifest.epoch,
                manifest.step,
                dict(manifest.metrics),
                paths,
                weights_only(manifest),
            )
            for saved in paths:
                self._by_path[saved] = logged.model_id
            self._logged.append(logged)
            early = paths & self._removed_early
            self._removed_early -= paths
        self.tag_paths(handle, logged.model_id, paths)
        for previous, saved in overwritten:
            self.release(handle, previous, saved)  # the file was overwritten: its old model may go
        return early

    def tag_paths(self, handle: RunHandle, model_id: str, paths: set[str]) -> None:
        """Tag the model with the local files that are it, beside the training (two requests not waited for)."""
        value = json.dumps(sorted(paths))

        def tag() -> None:
            try:
                handle.client.set_logged_model_tags(model_id, {TAG_PATHS: value})
            except Exception as exc:  # only a resumed run's retention needs it: the checkpoint is committed
                _log.warning(
                    "run %s: could not tag %s with its local paths: %s", handle.run_id, model_id, one_line(exc)
                )

        with self._lock:
            self._tagging = [f for f in self._tagging if not f.done()]
            self._tagging.append(_tagger.submit(tag))

    # --- retention -----------------------------------------------------------------------------

    def removed(self, path: str, may_precede_commit: Callable[[], bool]) -> str | None:
        """The model ``path`` is, now that ModelCheckpoint removed it. None when it is no model's: then, when
        ``may_precede_commit()`` says its commit may still be to come, that commit drops it."""
        with self._lock:
            model_id = self._by_path.get(path)
            if model_id is None and may_precede_commit():
                self._removed_early.add(path)
        return model_id

    def release(self, handle: RunHandle, model_id: str, path: str) -> None:
        """``path`` is no longer ``model_id``: delete the model when no kept file is it any more."""
        with self._lock:
            if self._by_path.get(path) == model_id:
                del self._by_path[path]
            kept = self._kept.get(model_id)
            if kept is None:
                return
            was_it = path in kept.paths
            kept.paths.discard(path)
            remaining = set(kept.paths)
            if not remaining:
                del self._kept[model_id]
                survivors = list(self._kept.values())
        if remaining:
            if was_it:
                # Its tag must stop naming the file (last.ckpt, overwritten by a later save): a resumed run's
                # trainer takes the tag's paths for the model's files.
                self.tag_paths(handle, model_id, remaining)
            return
        try:
            self._repoint(handle, model_id, survivors)
            catalog.delete(handle, model_id, kept.artifact_uri)
        except TrackingError as exc:
            _log.warning(
                "run %s: could not delete checkpoint %s (%s), which ModelCheckpoint removed (%s); "
                "`tracking gc` or `tracking verify --clean` removes it.",
                handle.run_id,
                model_id,
                layout.label(kept.keyed_by, kept.key),
                one_line(exc)[:300],
            )

    def _repoint(self, handle: RunHandle, leaving: str, survivors: list[Kept]) -> None:
        """Before a checkpoint the run's latest or best tag names goes, point the tag at a survivor."""
        handle.refresh_tags()
        tags: dict[str, str] = {}
        if handle.tags.get(layout.TAG_LATEST) == leaving and survivors:
            newest = max(survivors, key=lambda k: (k.key, k.step))
            tags.update({layout.TAG_LATEST: newest.model_id, layout.latest_key_tag(newest.keyed_by): str(newest.key)})
        monitor = handle.tags.get(layout.TAG_MONITOR)
        if handle.tags.get(layout.TAG_BEST) == leaving and monitor:
            mode = handle.tags.get(layout.TAG_MODE, "min")
            scored = {k.model_id: k.metrics[monitor] for k in survivors if monitor in k.metrics}
            if scored:
                best = (min if mode == "min" else max)(scored, key=lambda m: scored[m])
                tags.update({layout.TAG_BEST: best, layout.TAG_BEST_VALUE: repr(scored[best])})
        handle.set_tags(tags)

    # --- what is kept --------------------------------------------------------------------------

    def noted(self) -> dict[int, note.NotedCheckpoint]:
        """The kept checkpoints by key, as the run's description lists them."""
        with self._lock:
            return {k.key: note.NotedCheckpoint(k.model_id, k.metrics) for k in self._kept.values()}

    def paths_of(self, epoch: int, step: int) -> set[str]:
        """The local files that are the kept checkpoint of ``epoch`` and ``step`` (none if it is not kept)."""
        with self._lock:
            return next((set(k.paths) for k in self._kept.values() if (k.epoch, k.step) == (epoch, step)), set())

    def logged(self) -> list[LoggedCheckpoint]:
        """The checkpoints this trainer committed that are kept (oldest first)."""
        with self._lock:
            kept = set(self._kept)
            return [entry for entry in self._logged if entry.model_id in kept]

    def flush_tags(self) -> None:
        """Wait for the path tags under way."""
        with self._lock:
            tagging, self._tagging = self._tagging, []
        for future in tagging:
            future.result()


# Sets the path tags of every trainer's checkpoints, off the training loop's path.
_tagger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking-lightning-tags")
