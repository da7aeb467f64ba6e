"""The run, or the one checkpoint, a source names: before any checkpoint of it is picked.

A source is a run ID, ``runs:/<id>``, a checkpoint's logged model ``models:/<model_id>``, or
a registry version ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` / ``models:/<name>/latest``.
A run ID or ``runs:/`` names a run; the others pin one checkpoint (a registry version through the logged
model it was made from).
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

from tracking import catalog
from tracking.catalog import StoredCheckpoint
from tracking.config import TrackingConfig
from tracking.errors import NotFoundError, StorageError, one_line
from tracking.run import RunHandle, open_run
from tracking.uri import RunSource, parse_source


def resolve_run_id(source: str, config: TrackingConfig | None = None) -> str:
    """The run a run ID, ``runs:/``, ``models:/<model_id>`` or registry URI leads to."""
    handle, pinned = open_source(source, parse_source(source), config, checkpoint=False)
    return pinned.run_id if pinned is not None else handle.run_id  # type: ignore[union-attr]


def open_run_pinned(source: str, config: TrackingConfig | None = None) -> tuple[RunHandle, str | None]:
    """The run ``source`` names or was logged by, and the logged model ID it names (a ``models:/`` URI), else None."""
    handle, pinned = open_source(source, parse_source(source), config, checkpoint=False)
    if pinned is None:
        assert handle is not None
        return handle, None
    return open_run(pinned.run_id, config), pinned.model_id


def open_run_of(source: str, config: TrackingConfig | None = None) -> RunHandle:
    """The run ``source`` names or was logged by."""
    return open_run(resolve_run_id(source, config), config)


def open_source(
    source: str, parsed: RunSource, config: TrackingConfig | None, *, checkpoint: bool = True
) -> tuple[RunHandle | None, StoredCheckpoint | None]:
    """The run a source names, or the one checkpoint it pins (a model ID or registry version)."""
    _settle_background_saves()
    if parsed.run_id is not None:
        return open_run(parsed.run_id, config), None
    from mlflow.tracking import MlflowClient

    from tracking.config import bound_mlflow_requests

    bound_mlflow_requests()
    config = config or TrackingConfig.from_env()
    client = MlflowClient(tracking_uri=config.tracking_uri)
    if parsed.model_id is not None:
        return None, catalog.get(client, parsed.model_id, config, checkpoint=checkpoint)
    version = _registry_version(client, source, parsed)
    model_id = version_model_id(version)
    what = f"{source} (version {version.version} of {version.name!r}, source {version.source})"
    if model_id:
        # A model that exists but is no checkpoint raises here: catalog.get's message says so.
        found = catalog.get_if_present(client, model_id, config, checkpoint=checkpoint)
        if found is None:
            # models:/<name>/<version> and /latest name no alias to move: another version is loaded by its URI.
            instead = f"Load another version of {version.name!r}"
            if parsed.alias:
                instead = "Point the alias at another version"
            raise NotFoundError(
                f"{what}: its checkpoint models:/{model_id} (run {version.run_id}) no longer exists: it was deleted "
                f"(by retention, `tracking gc --delete-registered`, or by hand) after it was registered. {instead}, "
                "or register another checkpoint with `tracking register`."
            )
        return None, found
    if version.run_id and not checkpoint:
        return open_run(str(version.run_id), config), None
    # A version made from a run (runs:/<id>/...) names no checkpoint: the run's latest moves as training
    # goes on, so loading it would not give what was registered.
    raise NotFoundError(
        f"{what} names no checkpoint, only "
        + (f"run {version.run_id}, whose latest checkpoint changes as it trains" if version.run_id else "no run")
        + f"; register one checkpoint instead: `tracking register {version.run_id or 'RUN'} {version.name} "
        "--checkpoint best` (or latest, or an epoch)."
    )


def _settle_background_saves() -> None:
    """Let this process's background saves commit before it reads: a load (or a register) right after
    ``log_checkpoint(blocking=False)`` gets that checkpoint, not the one before it or none; a failed one raises.

    Not under a process group, where every rank's part of a background save coordinates with the others.
    """
    saver = sys.modules.get("tracking.saver")  # not imported: nothing was saved in the background
    distributed = sys.modules.get("tracking.parallel.distributed")
    if saver is not None and not (distributed is not None and distributed.active()):
        saver.wait_for_checkpoints()


def _registry_version(client: Any, source: str, parsed: RunSource) -> Any:
    from mlflow.exceptions import MlflowException

    name = str(parsed.model_name)
    try:
        if parsed.alias is not None:
            return client.get_model_version_by_alias(name, parsed.alias)
        if parsed.stage is not None:
            return _newest_version(client, source, name, parsed.stage)
        return client.get_model_version(name, str(parsed.version))
    except MlflowException as exc:
        if exc.error_code not in _NO_SUCH_VERSION:  # the server failed or is not there: retrying may help
            raise StorageError(
                f"{source}: the tracking server {client.tracking_uri} failed while reading the registry "
                f"({one_line(exc)[:500]}); check that it runs and MLFLOW_TRACKING_URI points at it, then retry."
            ) from exc
        raise NotFoundError(
            f"{source}: no such registered model version or alias ({exc.message}); check the name and "
            "alias in the MLflow UI's Models page."
        ) from exc


# What MLflow answers for a registered model, version or alias that does not exist (or a malformed one).
_NO_SUCH_VERSION = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}


def _newest_version(client: Any, source: str, name: str, stage: str) -> Any:
    """The newest version of ``name`` (``stage`` is ``latest``) or of those in ``stage``, as MLflow resolves
    ``models:/<name>/latest`` and ``models:/<name>/<stage>``."""
    from mlflow.exceptions import MlflowException

    latest = stage.lower() == "latest"
    numbered = re.fullmatch(r"[vV](\d+)", stage)  # "v3": a version as the UI shows it, no stage
    hint = f"; for version {numbered[1]}, write models:/{name}/{numbered[1]}" if numbered else ""
    try:
        with warnings.catch_warnings():
            if latest:  # MLflow's one call for it is deprecated for stages; models:/<name>/latest is not
                warnings.simplefilter("ignore", FutureWarning)
            found = client.get_latest_versions(name, None if latest else [stage])
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise NotFoundError(
            f"{source}: {stage!r} is no version number, 'latest' or stage ({exc.message}){hint}."
        ) from exc
    if found:
        return max(found, key=lambda version: int(version.version))
    raise NotFoundError(
        f"{source}: registered model {name!r} has no "
        + ("versions" if latest else f"version in stage {stage!r} (MLflow's deprecated stages)")
        + f"{hint}. Register a checkpoint with `tracking register RUN {name} --alias champion`, then load "
        f"models:/{name}@champion."
    )


# A version's source when it was made from a logged model: models:/<id> (MLflow's register_model,
# ours) or the model's artifact location (the UI's Register button). MLflow's own registry keeps
# no model ID on the version, so the source is what says which checkpoint it is.
_VERSION_SOURCE = re.compile(r"(?:^models:/|/models/)(m-[0-9a-f]{32})(?:/artifacts)?/?$")


def version_model_id(version: Any) -> str | None:
    """The checkpoint logged model a registry version was made from, if it names one."""
    if getattr(version, "model_id", None):
        return str(version.model_id)
    match = _VERSION_SOURCE.search(version.source or "")
    return match.group(1) if match else None
