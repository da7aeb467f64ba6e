"""Registering a checkpoint in MLflow's model registry, so ``models:/<name>@<alias>`` loads it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack, cast

from tracking import layout
from tracking.config import TrackingConfig, bound_mlflow_requests
from tracking.errors import ConfigError, StorageError
from tracking.manifest import Manifest
from tracking.output import agree
from tracking.run import RunHandle, tracking_server_errors
from tracking.selection import Selector, find_checkpoint
from tracking.source import version_model_id

# The logged model tag MLflow's own register_model keeps, so the UI links a model to its versions.
_VERSIONS_TAG = "mlflow.modelVersions"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """What :func:`registration` did: the version (MLflow's ``ModelVersion``) and whether it existed already."""

    version: Any
    reused: bool


class RegisterOptions(TypedDict, total=False):
    """The keyword arguments of :func:`registration`, which :func:`register` passes on as they are."""

    checkpoint: Selector
    alias: str | None
    allow_mixed: bool
    config: TrackingConfig | None


def register(source: str, name: str, **options: Unpack[RegisterOptions]) -> Any:
    """Make a version of registered model ``name`` from one checkpoint; MLflow's ``ModelVersion``.

    ``source`` is a run (then ``checkpoint`` picks ``"best"``, ``"latest"`` or an epoch) or a
    checkpoint's ``models:/<model_id>``. The version points at that checkpoint's logged model,
    so ``tracking.load("models:/<name>@<alias>")`` rebuilds exactly it, whatever the run logs later.
    A checkpoint that a version of ``name`` was made from already gets no second one: that version is
    returned (``alias`` moved to it), so a registration that failed part way is retried safely.
    A ``name`` whose versions are something else (whole models) is refused unless ``allow_mixed``:
    what loads ``models:/<name>@<alias>`` would then depend on which kind the alias names.
    """
    return registration(source, name, **options).version


def registration(
    source: str,
    name: str,
    *,
    checkpoint: Selector = "best",
    alias: str | None = None,
    allow_mixed: bool = False,
    config: TrackingConfig | None = None,
) -> Registration:
    """:func:`register`, saying whether the version was made now or one made before from the checkpoint reused."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_model_name(name)
    if alias is not None:
        check_alias(alias)
    pinned = source.strip().startswith("models:/")
    located = find_checkpoint(source, "latest" if pinned else checkpoint, config=config)
    assert located.model_id is not None
    bound_mlflow_requests()
    client = MlflowClient(tracking_uri=(config or TrackingConfig.from_env()).tracking_uri)
    tags = version_tags(located.name, located.manifest)
    made: str | None = None
    try:
        if not allow_mixed:
            refuse_mixed(client, name, located.label, checkpoint=True, escape="--allow-mixed (allow_mixed=True)")
        version = _version_made_from(client, name, located.model_id)
        reused = version is not None
        if version is None:
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            created = client.create_model_version(
                name, source=f"models:/{located.model_id}", run_id=located.run_id, model_id=located.model_id, tags=tags
            )
            version = _settle(client, name, located.model_id, created)
            reused = version is not created
        made = str(version.version)
        if reused and not tags.items() <= dict(version.tags or {}).items():
            # Made by the UI's Register button, which tags nothing: it gets the tags saying which checkpoint it is.
            for tag, value in tags.items():
                client.set_model_version_tag(name, made, tag, value)
            version = client.get_model_version(name, made)
        if alias is not None:
            client.set_registered_model_alias(name, alias, made)
        _link_version(client, located.model_id, name, version.version)
    except (MlflowException, OSError) as exc:
        # A retry finds the version made here and finishes with it: naming it tells that no second one is made.
        then = f"; version {made} of {name!r} was made from it, and a retry reuses it" if made else ""
        raise StorageError(
            f"registering {located.label} of run {located.run_id} as {name!r} failed ({exc}){then}; check the name "
            "and that the tracking server runs, then retry."
        ) from exc
    return Registration(version, reused)


def _version_made_from(client: Any, name: str, model_id: str) -> Any | None:
    """The oldest READY version of ``name`` made from logged model ``model_id``, else None.

    One exists when a registration created it and then failed (setting the alias, linking the model, or
    its answer lost on the way): registering the checkpoint again finishes with it rather than adding another.
    The oldest, as :func:`_settle` keeps: where two exist, every caller names the same one.
    """
    made = [
        version
        for version in client.search_model_versions(_name_filter(name))
        if version.name == name and version.status == "READY" and version_model_id(version) == model_id
    ]
    return min(made, key=lambda version: int(version.version), default=None)


def _settle(client: Any, name: str, model_id: str, created: Any) -> Any:
    """The version the checkpoint keeps once ``created`` exists: ``created``, or an older one made from it.

    Two registrations of one checkpoint at the same moment both find no version and both create one: MLflow
    has no create-if-absent. Each looks again after creating, and the newer deletes itself, so both callers
    return the oldest whatever order they ran in, and the checkpoint has one version of ``name``.
    """
    oldest = _version_made_from(client, name, model_id)
    if oldest is None or int(oldest.version) >= int(created.version):
        return created
    client.delete_model_version(name, str(created.version))
    _unlink_version(client, model_id, name, created.version)
    return oldest


def _link_version(client: Any, model_id: str, name: str, version: int | str) -> None:
    """List the new version in the logged model's ``mlflow.modelVersions`` tag, once.

    A tracking server lists it itself as it creates the version (its version an int), a local store does
    not: added again, the tag listed every version twice. A tag that is no such list (edited by hand) is
    replaced rather than failing the registration after the version exists.
    """
    # MLflow has no compare-and-set for tags: two registrations from this checkpoint at once (under two names)
    # both read the list, and the later write dropped the other's entry. Reading back after writing, and merging
    # again while ours is missing, narrows that to a writer whose stale list lands after our last read back.
    for written in range(_LINK_WRITES + 1):
        linked = _linked_versions(client, model_id)
        listed = {(entry.get("name"), str(entry.get("version"))) for entry in linked if isinstance(entry, dict)}
        if (name, str(version)) in listed:
            return
        if written == _LINK_WRITES:
            break
        linked.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {_VERSIONS_TAG: json.dumps(linked)})
    _log.warning(
        "logged model %s: version %s of %r is made, but other registrations kept overwriting its %s tag, "
        "so the UI does not link the model to it; register the checkpoint again to link it.",
        model_id,
        version,
        name,
        _VERSIONS_TAG,
    )


# Writes of the tag per registration before it gives up on listing its version (the version exists anyway).
_LINK_WRITES = 4


def _linked_versions(client: Any, model_id: str) -> list[Any]:
    """The logged model's ``mlflow.modelVersions`` list; empty when the tag is missing or no list."""
    try:
        linked = json.loads(client.get_logged_model(model_id).tags.get(_VERSIONS_TAG, "[]"))
    except ValueError:
        return []
    return linked if isinstance(linked, list) else []


def _unlink_version(client: Any, model_id: str, name: str, version: int | str) -> None:
    """Take a deleted version out of the logged model's ``mlflow.modelVersions`` tag, where a tracking server
    listed it as it created it (and leaves it when the version is deleted): the UI would link to nothing."""
    linked = _linked_versions(client, model_id)
    kept = [
        entry
        for entry in linked
        if not (isinstance(entry, dict) and (entry.get("name"), str(entry.get("version"))) == (name, str(version)))
    ]
    if len(kept) != len(linked):
        client.set_logged_model_tags(model_id, {_VERSIONS_TAG: json.dumps(kept)})


def refuse_mixed(client: Any, name: str, what: str, *, checkpoint: bool, escape: str) -> None:
    """ConfigError when registered model ``name`` has versions of the other kind than what is added to it.

    MLflow's registry takes any source under one name, but its consumers load by alias with one
    loader: ``tracking.load`` for a checkpoint, ``mlflow.pytorch.load_model`` for a whole model.
    ``checkpoint`` says whether ``what`` (a checkpoint or a whole model) is a checkpoint; ``escape`` is
    how the caller allows the mix anyway.
    """
    others = [
        str(version.version)
        for version in client.search_model_versions(_name_filter(name))
        if version.name == name and _is_checkpoint(client, version) not in (checkpoint, None)
    ]
    if not others:
        return
    listed = f"{agree(len(others), 'version', 'versions')} {', '.join(sorted(others, key=int))}"
    kind = (
        "no checkpoint (a whole model, e.g. from tracking.log_model(registered_model_name=...))"
        if checkpoint
        else "a checkpoint (from tracking register or the UI's Register model button on one)"
    )
    raise ConfigError(
        f"registered model {name!r} holds {listed} that {agree(len(others), 'is', 'are')} {kind}; registering "
        f"{what} beside them would make models:/{name}@ALIAS need tracking.load() or mlflow.pytorch.load_model() "
        f"depending on the version the alias names. Register it under another name (e.g. "
        f"{name}-{'checkpoints' if checkpoint else 'models'}), or pass {escape} if what loads it handles both."
    )


def _name_filter(name: str) -> str:
    """A search filter for the versions of registered model ``name`` (and, for some names, of others: check each).

    MLflow's filters have no escape for a quote: a name holding both kinds (which MLflow takes) is matched
    with LIKE, each ``'`` a one-character wildcard.
    """
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    return "name LIKE '" + name.replace("'", "_") + "'"


def _is_checkpoint(client: Any, version: Any) -> bool | None:
    """Whether a registry version was made from a checkpoint logged model (ours say so in a tag; the UI's do not);
    None when its logged model is deleted: nothing loads it, whatever it was."""
    from mlflow.exceptions import MlflowException

    if layout.VERSION_TAG_CHECKPOINT in (version.tags or {}):
        return True
    model_id = version_model_id(version)
    if model_id is None:
        return False  # made from a run's files (runs:/...): no checkpoint
    try:
        return bool(client.get_logged_model(model_id).model_type == layout.CHECKPOINT_MODEL_TYPE)
    except MlflowException:
        return None


def alias_version(name: str, alias: str, *, config: TrackingConfig | None = None) -> str | None:
    """The version ``models:/<name>@<alias>`` names now; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    bound_mlflow_requests()
    client = MlflowClient(tracking_uri=(config or TrackingConfig.from_env()).tracking_uri)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        # MLflow answers a missing model with RESOURCE_DOES_NOT_EXIST, a missing alias with INVALID_PARAMETER_VALUE.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise StorageError(
            f"reading alias {alias!r} of registered model {name!r} failed ({exc}); check that the tracking server "
            "runs, then retry."
        ) from exc


def version_tags(checkpoint: str, manifest: Manifest) -> dict[str, str]:
    """The tags saying which checkpoint a registry version is: its name, key, epoch and step (when recorded)."""
    tags = {layout.VERSION_TAG_CHECKPOINT: checkpoint, layout.VERSION_TAG_KEYED_BY: manifest.keyed_by}
    for tag, value in (
        (layout.VERSION_TAG_KEY, manifest.key),
        (layout.VERSION_TAG_EPOCH, manifest.epoch),
        (layout.VERSION_TAG_STEP, manifest.step),
    ):
        if value is not None:
            tags[tag] = str(value)
    return tags


def check_model_name(name: str) -> None:
    """ValueError unless ``name`` passes MLflow's rules for a registered model's name; checked before anything
    is logged or registered, so a refused name leaves nothing behind."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty registered model name, got {name!r}")
    try:
        _validate_model_name(name)
    except MlflowException as exc:
        suggestion = "-".join(part for part in name.replace(":", "/").split("/") if part) or "seed"
        raise ValueError(
            f"registered model name {name!r} cannot be used: {exc.message} Pick another name (e.g. {suggestion})."
        ) from None


def check_alias(alias: str) -> None:
    """ValueError unless ``alias`` passes MLflow's rules; checked before a version exists, so a refused alias
    leaves no version behind."""
    from mlflow.exceptions import MlflowException

    try:
        _mlflow_rule("_validate_alias_name", "_validate_model_alias_name")(alias)
        _mlflow_rule("_validate_alias_name_reserved", "_validate_model_alias_name_reserved")(alias)
    except MlflowException as exc:
        raise ValueError(f"alias {alias!r} cannot be used: {exc.message} Pick another alias (e.g. champion).") from None


def _mlflow_rule(*names: str) -> Callable[[str], None]:
    """MLflow's own check of a name, under the first of ``names`` that this MLflow has: they are private, and
    MLflow 3.18 renamed the alias ones (``_validate_model_alias_name`` became ``_validate_alias_name``)."""
    from mlflow.utils import validation

    for name in names:
        if (rule := getattr(validation, name, None)) is not None:
            return cast(Callable[[str], None], rule)
    raise ImportError(f"mlflow.utils.validation has none of {', '.join(names)}: this MLflow release is not supported")


def versions_point(versions: list[str]) -> str:
    """``registry version seed/1 points``, ``registry versions seed/3, seed/1 point``: what keeps a checkpoint."""
    return f"registry {agree(len(versions), 'version', 'versions')} {', '.join(versions)} " + agree(
        len(versions), "points", "point"
    )


def those_versions(versions: list[str]) -> str:
    """``that version`` or ``those versions``: what to delete for a checkpoint to go."""
    return agree(len(versions), "that version", "those versions")


def versions_by_model(handle: RunHandle) -> dict[str, list[str]]:
    """The registry versions made from the run's checkpoints: logged model ID -> ``["name/version", ...]``."""
    with tracking_server_errors(handle.run_id, "listing the registry versions made from the run"):
        versions = list(handle.client.search_model_versions(f"run_id = '{handle.run_id}'"))
    found: dict[str, list[str]] = {}
    for version in versions:
        model_id = version_model_id(version)
        if model_id is not None:
            found.setdefault(model_id, []).append(f"{version.name}/{version.version}")
    return found
