"""Which stored checkpoint (or state dict) a source names, without downloading any weights.

A source is a run ID, ``runs:/<id>``, a checkpoint's logged model ``models:/<model_id>``, or
a registry version ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` (which loads the
checkpoint that version was made from; :mod:`tracking.source` opens what it names). For a run,
a selector picks one of its checkpoints: ``"latest"``, ``"best"``, a key (the epoch, or the
global step in a run keyed by step), or (``step=``) a global step in any run. ``latest`` and
``best`` cost a constant number of requests through the run's pointer tags; a search of the
run's logged models is the fallback when a tag is missing or stale.
"""

from __future__ import annotations

import logging

from tracking import catalog, layout
from tracking.alternatives import no_checkpoints, what_else_loads
from tracking.catalog import LoggedCheckpoint, StoredCheckpoint
from tracking.config import TrackingConfig
from tracking.errors import IntegrityError, NotFoundError, TrackingError, one_line
from tracking.located import Located, locate, state_dict
from tracking.number import plain
from tracking.rank import rank_zero, warn_on_rank_zero
from tracking.run import RunHandle
from tracking.source import open_run_of, open_source
from tracking.uri import parse_source

Selector = str | int
_log = logging.getLogger(__name__)


def list_checkpoints(source: str, *, config: TrackingConfig | None = None) -> list[LoggedCheckpoint]:
    """Every committed checkpoint of a run (its manifest and logged model), oldest (lowest key) first.

    One whose manifest is unreadable is left out with a warning line naming it: one damaged
    checkpoint must not hide the healthy ones (``tracking verify`` reports it in full).
    """
    handle = open_run_of(source, config)
    committed = catalog.committed(handle)
    if not committed and (legacy := catalog.legacy_error(handle)) is not None:
        raise legacy
    found = []
    for checkpoint in committed.values():
        try:
            found.append(locate(checkpoint).logged())
        except NotFoundError:
            continue  # deleted since the search (retention)
        except IntegrityError as exc:
            warn_unreadable(handle.run_id, checkpoint, exc)
    return found


def warn_unreadable(run_id: str, checkpoint: StoredCheckpoint, exc: IntegrityError) -> None:
    """One warning line for a checkpoint left out of a listing because its manifest is damaged: said by rank 0
    alone under torchrun (every rank lists the same run)."""
    if not rank_zero():
        return
    _log.warning(
        "run %s: left out %s (%s), its manifest is unreadable: %s",
        run_id,
        checkpoint.name,
        checkpoint.model_id,
        one_line(exc)[:500],
    )


def find_checkpoint(
    source: str, checkpoint: Selector = "latest", *, step: int | None = None, config: TrackingConfig | None = None
) -> Located:
    """The checkpoint a source and selector resolve to (its manifest read, its data not).

    A source that names one checkpoint (``models:/...``) takes only the default ``"latest"``.
    """
    parsed = parse_source(source)
    handle, pinned = open_source(source, parsed, config)
    if pinned is not None:
        if checkpoint != "latest" or step is not None:
            raise ValueError(
                f"{source} names one checkpoint already; checkpoint=/step= pick among a run's checkpoints: "
                "pass the run ID instead."
            )
        return locate(pinned)
    assert handle is not None
    if parsed.artifact_path:
        raise ValueError(
            f"{source}: {parsed.artifact_path!r} is not a checkpoint; checkpoints are logged models: load "
            "models:/<model_id>, or runs:/<run_id> with checkpoint='latest' | 'best' | <epoch>."
        )
    return select_checkpoint(handle, checkpoint, step)


def find_weights(source: str, checkpoint: Selector | None = None, config: TrackingConfig | None = None) -> Located:
    """The run's state dict when it has one and no checkpoint is asked for, else a checkpoint."""
    parsed = parse_source(source)
    handle, pinned = open_source(source, parsed, config)
    if pinned is None and checkpoint is None:
        assert handle is not None
        if parsed.artifact_path.strip("/") in ("", layout.STATE_DICT_DIR):
            try:
                return state_dict(handle)
            except NotFoundError:
                if parsed.artifact_path:
                    raise
        return select_checkpoint(handle, "latest", None)
    return find_checkpoint(source, "latest" if checkpoint is None else checkpoint, config=config)


def find_state_dict(source: str, config: TrackingConfig | None = None) -> Located:
    """The state dict (``state_dict/``, from :func:`tracking.log_state_dict`) of the run ``source`` names."""
    handle = open_run_of(source, config)
    try:
        return state_dict(handle)
    except NotFoundError:
        raise NotFoundError(
            f"run {handle.run_id} has no state dict ({layout.STATE_DICT_DIR}/, logged by tracking.log_state_dict); "
            "its checkpoints hold the weights too: pick one with checkpoint='latest' (--checkpoint latest), "
            "'best' or an epoch."
        ) from None


def select_checkpoint(handle: RunHandle, checkpoint: Selector, step: int | None) -> Located:
    # An integer of any kind (numpy.int64 from a loop, a 0-d tensor) picks as the int it is, as it saves.
    step, checkpoint = plain(step), plain(checkpoint)  # type: ignore[assignment]
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be a global step number (an int >= 0), got {step!r}")
        if step < 0:
            raise ValueError(f"step must be a global step number >= 0, got {step}")
        if checkpoint != "latest":
            raise ValueError(
                f"pass checkpoint= or step=, not both: checkpoint={checkpoint!r} and step={step} would each pick "
                "a checkpoint of the run."
            )
        return _select_step(handle, step)
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int | str):
        raise TypeError(f"checkpoint must be 'latest', 'best' or an epoch (or step) number, got {checkpoint!r}")
    if isinstance(checkpoint, str) and checkpoint.isdecimal() and checkpoint.isascii():
        checkpoint = int(checkpoint)
    if isinstance(checkpoint, int):
        if checkpoint < 0:
            raise ValueError(f"checkpoint must be 'latest', 'best' or an epoch (or step) number >= 0, got {checkpoint}")
        keyed_by = layout.keyed_by_of(handle.tags)
        if keyed_by is not None:
            found = catalog.search(handle, key=checkpoint, keyed_by=keyed_by)
        else:  # no pointer tags (yet): the run's checkpoints say what they are keyed by
            found = [model for model in catalog.search(handle) if model.key == checkpoint]
        for stored in catalog.preferred(handle, found):
            try:
                return locate(stored)
            except NotFoundError:
                continue
        committed = catalog.committed(handle)
        if not committed and (legacy := catalog.legacy_error(handle)) is not None:
            raise legacy
        keyed_by = catalog.keyed_by(handle, committed.values())
        # Not the one asked for even when a READY model has its key: without its manifest it is none.
        others = sorted(key for key in committed if key != checkpoint)
        missing = f"run {handle.run_id}: no committed checkpoint for {layout.label(keyed_by, checkpoint)}"
        if not others:
            raise no_checkpoints(handle, missing)
        raise NotFoundError(
            f"{missing}; committed {keyed_by}s: {_key_list(others)}. Pass one of those, or checkpoint='latest' | "
            "'best' (--checkpoint latest | best)."
        )
    if checkpoint not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest', 'best' or an epoch (or step) number, got {checkpoint!r}")
    model_id = _tagged_model(handle, layout.TAG_LATEST if checkpoint == "latest" else layout.TAG_BEST)
    if model_id is not None:
        try:
            stored = catalog.get(handle.client, model_id, handle.config)
            if stored.status == catalog.READY and stored.run_id == handle.run_id:
                return locate(stored)
        except NotFoundError:
            pass  # a stale tag (checkpoint deleted by hand): fall back to searching below
    return _select_by_search(handle, checkpoint)


def _select_step(handle: RunHandle, step: int) -> Located:
    """The run's committed checkpoint logged at global ``step``, whatever the run's checkpoints are keyed by."""
    committed = catalog.committed(handle)
    for stored in committed.values():
        if stored.step is not None and stored.step != step:
            continue  # its params, written from its manifest, record another step: no need to read it
        try:
            located = locate(stored)
        except NotFoundError:
            continue
        if located.manifest.step == step:
            return located
    if not committed and (legacy := catalog.legacy_error(handle)) is not None:
        raise legacy
    if not committed:
        raise no_checkpoints(handle, f"run {handle.run_id}: no committed checkpoint was logged at step {step}")
    steps = sorted({stored.step for stored in committed.values() if stored.step is not None})
    raise NotFoundError(
        f"run {handle.run_id}: no committed checkpoint was logged at step {step}; their steps: {_key_list(steps)}. "
        "Pass one of those, or checkpoint='latest' | 'best'."
    )


def _tagged_model(handle: RunHandle, tag: str) -> str | None:
    """The logged model ID a pointer tag names; None (after a warning) when it names none."""
    value = handle.tags.get(tag)
    if not value:
        return None
    if value.startswith(f"{layout.LEGACY_CHECKPOINTS_DIR}/"):
        raise catalog.legacy_error(handle) or TrackingError(value)
    if not layout.MODEL_ID.fullmatch(value):
        # Tags are editable by anyone with access to the run: one that names no logged model is
        # a hint gone wrong, not corruption, and a search still knows the answer.
        warn_on_rank_zero(  # every rank of a job reads the same tag: said once
            f"run {handle.run_id}: tag {tag}={value[:200]!r} is not a logged model ID such as "
            f"m-{'0' * 32}; ignoring it and searching the run's checkpoints instead. "
            "Fix or delete the tag in the MLflow UI.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return value


def _select_by_search(handle: RunHandle, which: str) -> Located:
    # Every READY model, not one per key: while an epoch is re-logged, the one the (stale) tags name may
    # lose its manifest to the re-log, and then the same epoch's new model is the answer, not the epoch before.
    models = catalog.search(handle)
    by_key: dict[int, list[StoredCheckpoint]] = {}
    for model in models:
        if model.key is not None:
            by_key.setdefault(model.key, []).append(model)
    if not by_key:
        legacy = catalog.legacy_error(handle)
        if legacy is not None:
            raise legacy
        raise NotFoundError(
            f"run {handle.run_id} has no committed checkpoints (logged models of type "
            f"{layout.CHECKPOINT_MODEL_TYPE}); {what_else_loads(handle)}"
        )

    def candidates(keys: list[int]) -> list[StoredCheckpoint]:
        return [model for key in keys for model in catalog.preferred(handle, by_key[key])]

    if which == "latest":
        return _first_located(handle, candidates(sorted(by_key, reverse=True)))
    monitor = handle.tags.get(layout.TAG_MONITOR)
    # Each key ranks by the model readers take for it (the tags' pick, else its newest).
    committed = catalog.current(handle, models)
    keyed_by = catalog.keyed_by(handle, models)
    newest = committed[max(committed)] if committed else None
    if not monitor and newest is not None and handle.tags.get(layout.TAG_LATEST) != newest.model_id:
        # The tags lag behind the newest checkpoint: its save is between READY and moving the tags
        # (or died there), and its writer may well have passed monitor=.
        raise NotFoundError(
            f"run {handle.run_id} records no best checkpoint yet: the save of its newest checkpoint "
            f"({layout.label(keyed_by, max(committed))}) has not moved the run's pointer tags yet; retry in a "
            f"moment, or pick {_a(keyed_by)}: {_key_list(list(committed))}."
        )
    if not monitor:
        raise NotFoundError(
            f"run {handle.run_id} records no best checkpoint: log checkpoints with monitor=... "
            f"(or a Checkpointer), or pick checkpoint='latest' (--checkpoint latest) or {_a(keyed_by)}: "
            f"{_key_list(sorted(by_key))}."
        )
    mode = handle.tags.get(layout.TAG_MODE, "min")
    if mode not in layout.MODES:
        warn_on_rank_zero(  # every rank of a job reads the same tag: said once
            f"run {handle.run_id}: tag {layout.TAG_MODE}={mode[:200]!r} is not one of {', '.join(layout.MODES)}; "
            "ranking the checkpoints as 'min'. Fix the tag in the MLflow UI.",
            RuntimeWarning,
            stacklevel=4,
        )
        mode = "min"
    ranked = layout.best_first({e: c.metrics.get(monitor) for e, c in committed.items()}, mode)
    if not ranked:
        raise NotFoundError(f"run {handle.run_id}: no checkpoint has the monitored metric {monitor!r}.")
    return _first_located(handle, candidates(ranked))


def _first_located(handle: RunHandle, candidates: list[StoredCheckpoint]) -> Located:
    """The first of ``candidates`` whose manifest is stored: a READY model whose manifest is gone (deleted
    by hand, or by a retention that died before deleting the model) is no checkpoint, so the next one is."""
    for stored in candidates:
        try:
            return locate(stored)
        except NotFoundError:
            continue
    raise NotFoundError(
        f"run {handle.run_id}: none of its READY checkpoint logged models has a manifest; log a checkpoint again."
    )


def _key_list(keys: list[int]) -> str:
    return ", ".join(map(str, keys)) if keys else "none"


def _a(keyed_by: str) -> str:
    return f"an {keyed_by}" if keyed_by == layout.EPOCH else f"a {keyed_by}"
