"""What a committed checkpoint replaces: the run's other models of its key, and where best goes if it was one.

A re-log (a key saved again), a tag edited by hand or a save killed before the run's tags can
each leave more than one committed model of a key; the newest committed one is the checkpoint,
and the others go once it is (a model a registry version points at stays, so the version loads).
"""

from __future__ import annotations

import logging
import warnings

from tracking import catalog, layout
from tracking.errors import TrackingError
from tracking.manifest import Manifest
from tracking.run import RunHandle

_log = logging.getLogger(__name__)


def replaced(handle: RunHandle, manifest: Manifest, model_id: str) -> tuple[set[str], int | None]:
    """The models of this same key (epoch or step) that the new one replaces, and the run's latest key.

    Saving the latest key again needs no search: the latest tag names the model it replaces.
    Saving an earlier key than the latest tag says (a re-log, or a tag edited by hand) costs one
    search: every committed model of that key is replaced, or it would keep shadowing the new one
    for readers and `verify --clean`; and the latest tag is checked against the model it names.
    So does a save to a run whose latest tag names a model but whose key tag is missing or unreadable
    (deleted or edited by hand): without the search, any key would pass for the newest.
    """
    tags = handle.tags
    key = manifest.key
    assert key is not None
    latest_tag = layout.latest_key_tag(manifest.keyed_by)
    raw = tags.get(latest_tag, "")
    latest = int(raw) if raw.isdecimal() and raw.isascii() else None
    if latest is None and not tags.get(layout.TAG_LATEST):
        return set(), None  # the run's first checkpoint
    if latest is not None and key > latest:
        return set(), latest
    if key == latest:
        named = tags.get(layout.TAG_LATEST, "")
        return ({named} if named and named != model_id else set()), latest
    others = [model for model in catalog.search(handle) if model.model_id != model_id]
    replaced = {model.model_id for model in others if model.key == key}
    pointed = next((model for model in others if model.model_id == tags.get(layout.TAG_LATEST)), None)
    if pointed is None or pointed.key != latest:
        # Tags are editable by anyone with access to the run: one naming a key that its model is not
        # would pin latest there for good. The run's committed models say what latest is.
        actual = max((model.key for model in others if model.key is not None), default=None)
        _log.warning(
            "run %s: tag %s=%r does not match the checkpoint tag %s names; taking %s %s, the newest committed, "
            "as latest. Fix or delete the tag in the MLflow UI.",
            handle.run_id,
            latest_tag,
            raw[:50],
            layout.TAG_LATEST,
            manifest.keyed_by,
            actual,
        )
        latest = actual
    return replaced, latest


def left_by_a_killed_save(handle: RunHandle, manifest: Manifest, model_id: str) -> set[str]:
    """Committed models of this save's key made before it, looked for at this process's first commit to the run.

    A save killed between READY and the run's tags leaves a committed model that no tag names; the
    resumed job saves that key again, and without this both would stay, two models of one key in the
    run's list. One search per run and process, by the key's name; models made after this one (a writer
    racing on the same key) are left to that writer, which replaces this one.
    """
    where = (str(handle.client.tracking_uri), handle.run_id)
    if where in _committed_here:
        return set()
    _committed_here.add(where)
    assert manifest.key is not None
    same_key = [m.model_id for m in catalog.search(handle, key=manifest.key, keyed_by=manifest.keyed_by)]
    return set(same_key[: same_key.index(model_id)]) if model_id in same_key else set()


# Runs this process committed a checkpoint to, by (tracking URI, run ID): see left_by_a_killed_save.
_committed_here: set[tuple[str, str]] = set()


def best_survivor(handle: RunHandle, leaving: set[str], monitor: str, mode: str) -> tuple[str, float] | None:
    """The best committed checkpoint of the run outside ``leaving`` by ``monitor``: (model ID, value).

    Of each key, only the model readers take counts: one a re-log replaced (kept for a registry version,
    or left by a racing writer) is no checkpoint of the run any more.
    """
    staying = [m for m in catalog.search(handle) if m.model_id not in leaving]
    by_id = {m.model_id: m for m in catalog.current(handle, staying).values() if monitor in m.metrics}
    ranked = sorted(by_id.values(), key=lambda m: ((1.0 if mode == "min" else -1.0) * m.metrics[monitor], m.key or 0))
    return (ranked[0].model_id, ranked[0].metrics[monitor]) if ranked else None


def delete_replaced(handle: RunHandle, replaced: set[str]) -> None:
    """Delete the models a re-log replaced, but one a registry version points at: ``models:/<name>@<alias>``
    must go on loading exactly what it named (retention keeps those too). One already gone (two writers
    re-logging the run's latest key both replace the model the tags named) counts as deleted."""
    from tracking.output import agree
    from tracking.registry import those_versions, versions_by_model, versions_point

    try:
        registered = versions_by_model(handle)
    except TrackingError as exc:
        warnings.warn(
            f"run {handle.run_id}: the re-logged checkpoint replaces {', '.join(sorted(replaced))}, left in place: "
            f"the registry versions made from the run could not be listed ({exc}). It is no longer latest, and "
            "`tracking verify --clean` removes it unless a version points at it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    for model_id in sorted(replaced):
        if model_id in registered:
            versions = registered[model_id]
            they = those_versions(versions)
            warnings.warn(
                f"run {handle.run_id}: the re-logged checkpoint replaces {model_id}, which {versions_point(versions)} "
                f"at: it stays, so that {they} {agree(len(versions), 'loads', 'load')} it still (the run's readers "
                f"take the new one). Delete {they} first for `tracking verify --clean` to remove it.",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        try:
            stored = catalog.get_if_present(handle.client, model_id, handle.config)
            # None: gone already. Another writer re-logging this key replaced it first, and deleted it.
            if stored is not None:
                catalog.delete(handle, stored.model_id, stored.artifact_uri)
        except TrackingError as exc:
            warnings.warn(
                f"run {handle.run_id}: the re-logged checkpoint replaces {model_id}, which could not be deleted "
                f"({exc}); it is no longer latest, and `tracking verify --clean` removes it.",
                RuntimeWarning,
                stacklevel=3,
            )
