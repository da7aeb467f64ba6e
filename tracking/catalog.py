"""A run's checkpoints as MLflow logged models: create one, find one, list them, delete one.

Each checkpoint is a logged model of its run (see :mod:`tracking.layout` for the names),
with its files in the logged model's own artifact location. Both the writing side and the
reading side go through this module, so neither needs to know how MLflow is asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tracking import layout
from tracking.config import TrackingConfig
from tracking.errors import NotACheckpoint, NotFoundError, StorageError, TrackingError, one_line
from tracking.manifest import Manifest
from tracking.run import RunHandle, tracking_server_errors
from tracking.storage import ArtifactStore, open_store

READY = "READY"
PENDING = "PENDING"
FAILED = "FAILED"

# search_logged_models answers at most this many per page.
_PAGE = 100


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint's logged model: its ID, key (epoch or step), step, status, and the store of its files."""

    model_id: str
    name: str
    epoch: int | None
    key: int | None
    keyed_by: str
    step: int | None  # the global step its params record; None when saved without one
    status: str
    run_id: str
    metrics: dict[str, float]
    created_ms: int
    artifact_uri: str
    store: ArtifactStore
    format: str | None = None  # what wrote it: "torch" (tracking.log_checkpoint), "lightning", "transformers"...

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"

    def read_manifest(self) -> Manifest:
        return layout.read_manifest(self.store)


@dataclass(frozen=True)
class LoggedCheckpoint:
    """A committed checkpoint (or a run's state dict): where it is, and its manifest.

    ``model_id`` is the checkpoint's logged model (load it as ``models:/<model_id>``) and
    ``artifact_uri`` where its files are; a state dict has neither and lives in the run's
    ``path`` folder.
    """

    run_id: str
    path: str
    manifest: Manifest
    model_id: str | None = None
    artifact_uri: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}" if self.model_id else f"runs:/{self.run_id}/{self.path}"

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch

    @property
    def step(self) -> int | None:
        return self.manifest.step

    @property
    def key(self) -> int | None:
        return self.manifest.key

    @property
    def keyed_by(self) -> str:
        return self.manifest.keyed_by

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest.metrics


def create(handle: RunHandle, manifest: Manifest) -> StoredCheckpoint:
    """A new PENDING logged model for the checkpoint ``manifest`` describes, owned by the run.

    A run's checkpoints are keyed by one thing: one keyed otherwise than the run's earlier ones
    is refused here, before anything is stored.
    """
    assert manifest.epoch is not None and manifest.key is not None
    refuse_mixed_keys(handle, manifest.keyed_by)
    params = {layout.PARAM_EPOCH: str(manifest.epoch), layout.PARAM_MODEL_CLASS: str(manifest.model.get("class"))}
    if manifest.step is not None:
        params[layout.PARAM_STEP] = str(manifest.step)
    with tracking_server_errors(handle.run_id, "creating the checkpoint's logged model"):
        model = handle.client.create_logged_model(
            experiment_id=handle.experiment_id,
            name=layout.checkpoint_name(manifest.key, manifest.keyed_by),
            source_run_id=handle.run_id,
            params=params,
            tags={layout.TAG_FORMAT: manifest.format, layout.TAG_FORMAT_VERSION: str(manifest.format_version)},
            model_type=layout.CHECKPOINT_MODEL_TYPE,
        )
    # Link it to the run as an output (what the run page's "Logged models" lists) beside the upload:
    # nothing waits on the link until READY, so a small checkpoint does not pay for it in turn.
    _links[model.model_id] = _linker.submit(_link, handle, model.model_id, manifest.key)
    return _wrap(model, handle.config)


def refuse_mixed_keys(handle: RunHandle, keyed_by: str, listed: Iterable[StoredCheckpoint] | None = None) -> None:
    """Raise when the run's committed checkpoints are keyed by something else than ``keyed_by``.

    ``listed``: the run's committed checkpoints when the caller has just searched them (no search then).
    """
    if not handle.tags:
        handle.refresh_tags()  # a writer's handle opened without them (log_checkpoint reuses one)
    recorded = layout.keyed_by_of(handle.tags)
    if recorded is None:
        # No tag says (the run's first save, or its tags deleted by hand): its committed checkpoints do.
        models = search(handle) if listed is None else listed
        recorded = next((model.keyed_by for model in models if model.key is not None), None)
    if recorded is not None and recorded != keyed_by:
        raise TrackingError(
            f"run {handle.run_id} keys its checkpoints by {recorded}, and this one is keyed by {keyed_by}: a run's "
            f"checkpoints are all keyed by epoch or all by step. Log it to a new run, or save by {recorded} as the "
            "run's earlier checkpoints were."
        )


def refuse_rewind(handle: RunHandle, keyed_by: str, resumed: int, from_latest: str) -> None:
    """Raise when the run holds committed checkpoints after ``resumed``, the key a training resumes from and goes
    on logging to the run: it would log a second history over them, and "latest", which never moves back, would
    name the abandoned one's until the new one passed it. ``from_latest``: the framework's line that resumes from
    the run's latest instead."""
    stored = committed(handle)
    later = [key for key in stored if key > resumed]
    if not later:
        return
    # The latest as readers take it: the one the run's tag names, else the newest. A save killed between READY
    # and moving the tags left a newer one, which a resume from that latest (a crashed job's) logs again.
    tagged = handle.tags.get(layout.TAG_LATEST)
    if resumed >= next((key for key, model in stored.items() if model.model_id == tagged), max(stored)):
        return
    shown = ", ".join(str(key) for key in later[:5]) + (", ..." if len(later) > 5 else "")
    raise TrackingError(
        f"run {handle.run_id}: this training resumes from {layout.label(keyed_by, resumed)}, but the run has later "
        f"checkpoints ({keyed_by}s {shown}): going on in it would rewrite its later history, and tracking.load "
        f"would give the abandoned training's {layout.label(keyed_by, later[-1])} until the new one passed it. "
        "Nothing was trained or logged. Resume into a new MLflow run (start one with mlflow.start_run() or give "
        f"another run), or resume from the run's latest: {from_latest}."
    )


def refuse_restart(
    handle: RunHandle,
    format: str,
    from_latest: str,
    *,
    no_resume: Callable[[StoredCheckpoint], str | None] = lambda latest: None,
) -> None:
    """Raise when the run holds committed checkpoints of ``format`` and a training that resumes from none of them
    (a fresh one: a notebook cell run again into its run, a long-lived active run) would go on logging to it: it
    would log a second history over them, and "latest", which never moves back, would name the earlier
    training's until the new one passed it. ``from_latest``: the framework's line that resumes from the run's
    latest instead; ``no_resume(latest)``: why no training resumes from that checkpoint (the weights alone), or
    None when one does: then the error offers the new run only."""
    stored = {key: model for key, model in committed(handle).items() if model.format == format}
    if not stored:
        return
    # The latest as readers take it: the one the run's tag names, else the newest.
    tagged = handle.tags.get(layout.TAG_LATEST)
    latest = next((model for model in stored.values() if model.model_id == tagged), stored[max(stored)])
    keys = list(stored)
    shown = ", ".join(str(key) for key in keys[:5]) + (", ..." if len(keys) > 5 else "")
    label = layout.label(latest.keyed_by, latest.key)
    new_run = "Train into a new MLflow run (start one with mlflow.start_run() or give another run)"
    why_not = no_resume(latest)
    ways = (
        f"{new_run}, or resume from the run's latest: {from_latest}." if why_not is None else f"{new_run}: {why_not}."
    )
    raise TrackingError(
        f"run {handle.run_id}: this training starts afresh, but the run has checkpoints of an earlier one "
        f"({latest.keyed_by}s {shown}; latest {label}): going on in it would rewrite its history, and tracking.load "
        f"would give the earlier training's {label} until the new one passed it. Nothing was trained or logged. {ways}"
    )


# model ID -> its pending link to the run, waited on by set_status(READY).
_links: dict[str, Future[None]] = {}
_linker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tracking-link")


def _link(handle: RunHandle, model_id: str, key: int) -> None:
    from mlflow.entities import LoggedModelOutput

    with tracking_server_errors(handle.run_id, f"linking checkpoint {model_id} to the run"):
        handle.client.log_outputs(handle.run_id, [LoggedModelOutput(model_id, step=key)])


def set_status(handle: RunHandle, checkpoint: StoredCheckpoint, status: str) -> None:
    """Mark a checkpoint's model READY (once it is linked to its run) or FAILED."""
    link = _links.pop(checkpoint.model_id, None)
    if link is not None and status == READY:
        link.result()
    with tracking_server_errors(handle.run_id, f"marking {checkpoint.name} ({checkpoint.model_id}) {status}"):
        handle.client.finalize_logged_model(checkpoint.model_id, status)


def get(client: Any, model_id: str, config: TrackingConfig, *, checkpoint: bool = True) -> StoredCheckpoint:
    """The logged model ``model_id``; NotFoundError when there is none (or it is deleted), or when
    ``checkpoint`` asks for a checkpoint and it is another kind of model (a whole model)."""
    model = get_if_present(client, model_id, config, checkpoint=checkpoint)
    if model is None:
        raise NotFoundError(
            f"models:/{model_id}: no such logged model on {client.tracking_uri}; check the model ID "
            "(the run page's Logged models) and MLFLOW_TRACKING_URI."
        )
    return model


def get_if_present(
    client: Any, model_id: str, config: TrackingConfig, *, checkpoint: bool = True
) -> StoredCheckpoint | None:
    """:func:`get`, but None when there is no such logged model or it is deleted: for a writer about to
    delete it, which finds it gone when another writer deleted it first."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_logged_model(model_id)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            return None
        raise StorageError(
            f"models:/{model_id}: the tracking server {client.tracking_uri} failed ({one_line(exc)[:500]}); "
            "check that it runs and MLFLOW_TRACKING_URI points at it, then retry."
        ) from exc
    except OSError as exc:
        raise StorageError(
            f"models:/{model_id}: cannot reach the tracking server {client.tracking_uri} ({exc}); check that it "
            "runs and MLFLOW_TRACKING_URI points at it, then retry."
        ) from exc
    if checkpoint and model.model_type != layout.CHECKPOINT_MODEL_TYPE:
        raise NotACheckpoint(
            f"models:/{model_id} ({model.name}) is a {model.model_type or 'plain'} logged model, not a checkpoint; "
            "load a whole model with tracking.load_pickled_model() or mlflow.pytorch.load_model().",
            model.source_run_id,
            model.name,
        )
    return _wrap(model, config)


def search(
    handle: RunHandle, *, key: int | None = None, keyed_by: str = layout.EPOCH, status: str | None = READY
) -> list[StoredCheckpoint]:
    """The run's checkpoint logged models (of one key, of one status), oldest first."""
    terms = [f"source_run_id = '{handle.run_id}'", f"model_type = '{layout.CHECKPOINT_MODEL_TYPE}'"]
    if key is not None:
        terms.append(f"name = '{layout.checkpoint_name(key, keyed_by)}'")
    # Filtered here: the SQL stores do not match status in a filter string.
    models = [_wrap(model, handle.config) for model in _pages(handle, " AND ".join(terms))]
    return [m for m in models if status is None or m.status == status]


def committed(handle: RunHandle) -> dict[int, StoredCheckpoint]:
    """The run's READY checkpoints by key (of one logged twice, see :func:`preferred`): one search."""
    return current(handle, search(handle))


def current(handle: RunHandle, models: list[StoredCheckpoint]) -> dict[int, StoredCheckpoint]:
    """Of ``models`` (oldest first), the READY one of each key that readers take, by key (epoch or step)."""
    by_key: dict[int, list[StoredCheckpoint]] = {}
    for model in models:
        if model.key is not None and model.status == READY:
            by_key.setdefault(model.key, []).append(model)
    return {key: preferred(handle, by_key[key])[0] for key in sorted(by_key)}


def keyed_by(handle: RunHandle, models: Iterable[StoredCheckpoint] = ()) -> str:
    """What the run's checkpoints are keyed by: its tags say, else ``models`` (found by a search), else epoch."""
    return layout.keyed_by_of(handle.tags) or next((m.keyed_by for m in models if m.key is not None), layout.EPOCH)


def preferred(handle: RunHandle, models: list[StoredCheckpoint]) -> list[StoredCheckpoint]:
    """One key's logged models (oldest first) in the order readers try them: the one the run's
    latest/best tags name, then the newest first. A re-log counts once the tags moved to it: one
    killed after READY but before the tags must not shadow the checkpoint the tags still name."""
    pointed = {handle.tags.get(layout.TAG_LATEST), handle.tags.get(layout.TAG_BEST)}
    return sorted(reversed(models), key=lambda model: model.model_id not in pointed)


def delete(handle: RunHandle, model_id: str, artifact_uri: str) -> None:
    """Delete a checkpoint: its manifest first (it stops existing), then its files, then its logged model.

    A checkpoint already deleted (by another writer) is no error, as a missing file is none to the store.
    """
    store = open_store(artifact_uri, handle.config, owner=f"run {handle.run_id}, {model_id}")
    store.delete(layout.MANIFEST_FILE)
    for name in store.list_files(""):
        store.delete(name)
    from mlflow.exceptions import MlflowException

    with tracking_server_errors(handle.run_id, f"deleting checkpoint {model_id}"):
        try:
            handle.client.delete_logged_model(model_id)
        except MlflowException as exc:
            # Deleted by another writer and purged since (`mlflow gc`): gone, as this deletion meant it to be.
            # A deleted model that is not purged deletes again without an error.
            if exc.error_code not in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
                raise


def legacy_error(handle: RunHandle) -> TrackingError | None:
    """The error for a run whose checkpoints are run artifacts (the layout before logged models), if it is one."""
    pointer = handle.tags.get(layout.TAG_LATEST, "")
    legacy = pointer.startswith(f"{layout.LEGACY_CHECKPOINTS_DIR}/") or bool(
        handle.store.list_files(layout.LEGACY_CHECKPOINTS_DIR)
    )
    if not legacy:
        return None
    return TrackingError(
        f"run {handle.run_id} stores its checkpoints as run artifacts under {layout.LEGACY_CHECKPOINTS_DIR}/, "
        "the layout before checkpoints became MLflow logged models, which this version does not read. "
        f"Download them with `mlflow artifacts download -r {handle.run_id} -a {layout.LEGACY_CHECKPOINTS_DIR}`, "
        "or read the run with the release that wrote it."
    )


def _pages(handle: RunHandle, filter_string: str) -> Iterator[Any]:
    token = None
    while True:
        with tracking_server_errors(handle.run_id, "listing the run's checkpoints"):
            page = handle.client.search_logged_models(
                experiment_ids=[handle.experiment_id],
                filter_string=filter_string,
                order_by=[{"field_name": "creation_timestamp", "ascending": True}],
                max_results=_PAGE,
                page_token=token,
            )
        yield from page
        token = page.token
        if not token:
            return


def _key(model: Any) -> tuple[str, int | None, int | None]:
    """What a logged model is keyed by, its key, and its epoch: its params say, else its name."""
    params = model.params or {}
    keyed_by, named = layout.key_of(model.name) or (layout.EPOCH, None)
    epoch = _count(params.get(layout.PARAM_EPOCH, ""))
    if keyed_by == layout.STEP:
        return keyed_by, _count(params.get(layout.PARAM_STEP, ""), named), epoch
    epoch = named if epoch is None else epoch
    return keyed_by, epoch, epoch


def _count(raw: str, otherwise: int | None = None) -> int | None:
    # ASCII digits only, as in names: str.isdecimal() also takes other scripts' digits such as "١٢".
    return int(raw) if raw.isdecimal() and raw.isascii() else otherwise


def _wrap(model: Any, config: TrackingConfig) -> StoredCheckpoint:
    metrics: dict[str, float] = {}
    for metric in sorted(model.metrics or [], key=lambda m: (m.step, m.timestamp)):
        metrics[metric.key] = metric.value  # the last logged value of each
    store = open_store(
        model.artifact_location, config, owner=f"run {model.source_run_id}, {model.name} ({model.model_id})"
    )
    keyed_by, key, epoch = _key(model)
    return StoredCheckpoint(
        model_id=model.model_id,
        name=model.name,
        epoch=epoch,
        key=key,
        keyed_by=keyed_by,
        step=_count((model.params or {}).get(layout.PARAM_STEP, "")),
        status=str(model.status),
        run_id=str(model.source_run_id),
        metrics=metrics,
        created_ms=model.creation_timestamp,
        artifact_uri=model.artifact_location,
        store=store,
        format=(model.tags or {}).get(layout.TAG_FORMAT),
    )
