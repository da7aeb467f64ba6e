"""Which run and which stored artifact a source names, without downloading any weights.

A source is a run ID, ``runs:/<id>[/checkpoints/epoch_NNNN]`` or a registry URI
(``models:/<name>@<alias>``, ``models:/<name>/<version>``); a checkpoint selector is
``"latest"``, ``"best"``, an epoch number, or a global step. ``latest`` and ``best``
cost one manifest read through the run's pointer tags; a listing is the fallback when
a tag is missing or stale.
"""

from __future__ import annotations

import warnings

from tracking import layout
from tracking.config import TrackingConfig
from tracking.errors import NotFoundError
from tracking.manifest import Manifest
from tracking.run import RunHandle, open_run
from tracking.uri import RunSource, parse_source

Selector = str | int


def resolve_run_id(source: str, config: TrackingConfig | None = None) -> str:
    """The run a run ID, ``runs:/`` URI or ``models:/`` registry URI leads to."""
    return _run_id(source, parse_source(source), config)


def open_source(
    source: str, checkpoint: Selector | None, config: TrackingConfig | None
) -> tuple[RunHandle, Selector | None]:
    """Open the run ``source`` names; a checkpoint folder in a ``runs:/`` URI becomes the selector."""
    parsed = parse_source(source)
    handle = open_run(_run_id(source, parsed, config), config)
    if not parsed.artifact_path:
        return handle, checkpoint
    epoch = layout.epoch_of(parsed.artifact_path)
    if epoch is None:
        raise ValueError(
            f"{source}: {parsed.artifact_path!r} is not a checkpoint folder; use runs:/<run_id> and pick one with "
            f"checkpoint='latest' | 'best' | <epoch>, or runs:/<run_id>/{layout.checkpoint_dir(7)}."
        )
    if checkpoint not in (None, "latest", epoch, str(epoch)):
        raise ValueError(f"{source} names epoch {epoch}, but checkpoint={checkpoint!r} asks for another; pass one.")
    return handle, epoch


def list_checkpoints(source: str, *, config: TrackingConfig | None = None) -> list[Manifest]:
    """Manifests of every committed checkpoint of a run, oldest epoch first."""
    handle = open_run(resolve_run_id(source, config), config)
    return [layout.read_manifest(handle.store, layout.checkpoint_dir(e)) for e in layout.committed_epochs(handle.store)]


def find_checkpoint(
    source: str, checkpoint: Selector = "latest", *, config: TrackingConfig | None = None
) -> tuple[str, Manifest]:
    """The folder and manifest a checkpoint selector resolves to, without downloading the file."""
    handle, selector = open_source(source, checkpoint, config)
    return select_checkpoint(handle, "latest" if selector is None else selector, None)


def select_checkpoint(handle: RunHandle, checkpoint: Selector, step: int | None) -> tuple[str, Manifest]:
    store = handle.store
    if step is not None:
        for epoch in layout.committed_epochs(store):
            manifest = layout.read_manifest(store, layout.checkpoint_dir(epoch))
            if manifest.step == step:
                return layout.checkpoint_dir(epoch), manifest
        raise NotFoundError(f"run {handle.run_id}: no checkpoint was logged at step {step}.")
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int | str):
        raise TypeError(f"checkpoint must be 'latest', 'best' or an epoch number, got {checkpoint!r}")
    if isinstance(checkpoint, str) and checkpoint.isdecimal() and checkpoint.isascii():
        checkpoint = int(checkpoint)
    if isinstance(checkpoint, int):
        folder = layout.checkpoint_dir(checkpoint)
        try:
            return folder, layout.read_manifest(store, folder)
        except NotFoundError:
            epochs = layout.committed_epochs(store)
            raise NotFoundError(
                f"run {handle.run_id}: no checkpoint for epoch {checkpoint} ({layout.manifest_path(folder)} "
                f"is missing); committed epochs: {_epoch_list(epochs)}."
            ) from None
    if checkpoint not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest', 'best' or an epoch number, got {checkpoint!r}")
    tagged = _tagged_folder(handle, layout.TAG_LATEST if checkpoint == "latest" else layout.TAG_BEST)
    if tagged is not None:
        try:
            return tagged, layout.read_manifest(store, tagged)
        except NotFoundError:
            pass  # a stale tag (checkpoint deleted by hand): fall back to listing below
    return _select_by_listing(handle, checkpoint)


def _tagged_folder(handle: RunHandle, tag: str) -> str | None:
    """The checkpoint folder a pointer tag names; None (after a warning) when it names none."""
    value = handle.tags.get(tag)
    if not value:
        return None
    epoch = layout.epoch_of(value)
    if epoch is None:
        # Tags are editable by anyone with access to the run: one that names no checkpoint folder
        # is a hint gone wrong, not corruption, and the listing still knows the answer.
        warnings.warn(
            f"run {handle.run_id}: tag {tag}={value[:200]!r} does not name a checkpoint folder such as "
            f"{layout.checkpoint_dir(7)}; ignoring it and listing the run's checkpoints instead. "
            "Fix or delete the tag in the MLflow UI.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return layout.checkpoint_dir(epoch)


def select_weights(handle: RunHandle, checkpoint: Selector | None) -> tuple[str, Manifest, str]:
    """The state dict artifact when there is one and no checkpoint is asked for, else a checkpoint."""
    if checkpoint is None:
        try:
            manifest = layout.read_manifest(handle.store, layout.STATE_DICT_DIR)
            return layout.STATE_DICT_DIR, manifest, next(iter(manifest.files))
        except NotFoundError:
            checkpoint = "latest"
    folder, manifest = select_checkpoint(handle, checkpoint, None)
    return folder, manifest, layout.checkpoint_file(manifest)


def _select_by_listing(handle: RunHandle, which: str) -> tuple[str, Manifest]:
    store = handle.store
    epochs = layout.committed_epochs(store)
    if not epochs:
        raise NotFoundError(
            f"run {handle.run_id} has no committed checkpoints under {layout.CHECKPOINTS_DIR}/; log one with "
            "tracking.log_checkpoint(...) or load the state dict with tracking.load_model()."
        )
    if which == "latest":
        return layout.checkpoint_dir(epochs[-1]), layout.read_manifest(store, layout.checkpoint_dir(epochs[-1]))
    monitor = handle.tags.get(layout.TAG_MONITOR)
    if not monitor:
        raise NotFoundError(
            f"run {handle.run_id} records no best checkpoint: log checkpoints with monitor=... "
            f"(or a Checkpointer), or pick an epoch: {_epoch_list(epochs)}."
        )
    mode = handle.tags.get(layout.TAG_MODE, "min")
    if mode not in layout.MODES:
        warnings.warn(
            f"run {handle.run_id}: tag {layout.TAG_MODE}={mode[:200]!r} is not one of {', '.join(layout.MODES)}; "
            "ranking the checkpoints as 'min'. Fix the tag in the MLflow UI.",
            RuntimeWarning,
            stacklevel=4,
        )
        mode = "min"
    manifests = {e: layout.read_manifest(store, layout.checkpoint_dir(e)) for e in epochs}
    ranked = layout.best_first({e: m.metrics.get(monitor) for e, m in manifests.items()}, mode)
    if not ranked:
        raise NotFoundError(f"run {handle.run_id}: no checkpoint has the monitored metric {monitor!r}.")
    return layout.checkpoint_dir(ranked[0]), manifests[ranked[0]]


def _run_id(source: str, parsed: RunSource, config: TrackingConfig | None) -> str:
    if parsed.run_id is not None:
        return parsed.run_id
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(config or TrackingConfig.from_env()).tracking_uri)
    name = str(parsed.model_name)
    try:
        if parsed.alias is not None:
            version = client.get_model_version_by_alias(name, parsed.alias)
        else:
            version = client.get_model_version(name, str(parsed.version))
    except MlflowException as exc:
        raise NotFoundError(
            f"{source}: no such registered model version or alias ({exc.message}); check the name and "
            "alias in the MLflow UI's Models page."
        ) from exc
    if not version.run_id:
        raise NotFoundError(f"{source} (version {version.version}) is not linked to a run; load it by run ID.")
    return str(version.run_id)


def _epoch_list(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs)) if epochs else "none"
