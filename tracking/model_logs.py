"""Logging the model alone to an MLflow run: its state dict, or the whole model.

Resumable checkpoints (model, optimizer and counters together) are :mod:`tracking.checkpoint`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from tracking import layout, spec
from tracking.catalog import LoggedCheckpoint
from tracking.config import TrackingConfig
from tracking.errors import IntegrityError, NotFoundError, TrackingError
from tracking.manifest import FORMAT_VERSION, Manifest, now, versions
from tracking.parallel import distributed
from tracking.payload import TorchSave, check_int64, check_loadable, check_model
from tracking.registry import check_model_name, refuse_mixed
from tracking.run import RunHandle, open_run, target_run_id, tracking_server_errors


def log_state_dict(
    model: nn.Module,
    *,
    run_id: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    format: str = "torch",
    epoch: int | None = None,
    step: int | None = None,
    config: TrackingConfig | None = None,
) -> LoggedCheckpoint:
    """Log ``model.state_dict()`` as ``state_dict/state_dict.pt`` (or ``.safetensors``) plus a manifest.

    The file loads with the plain ``model.load_state_dict(torch.load(f, weights_only=True))``. ``epoch``, the
    epoch the weights are from (e.g. the last one trained), is recorded in the manifest, and so is ``step``, the
    global step they are from: a training that charts by step puts what is measured of them there.
    """
    check_model(model)
    model = distributed.unwrap(model)
    if format not in ("torch", "safetensors"):
        raise ValueError(f"format must be 'torch' or 'safetensors', got {format!r}")
    # Plain ints from here on: a numpy integer would not go into the manifest's JSON.
    epoch = None if epoch is None else check_int64("epoch", epoch)
    step = None if step is None else check_int64("step", step)
    handle = open_run(target_run_id(run_id), config)
    state = model.state_dict()
    _refuse_sharded(handle, state, "log_state_dict")
    check_loadable(state, "model.state_dict()")
    previous = _stored_state_dict_files(handle)
    name = _state_dict_file(format, previous)
    if format == "safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in state.items()})
        stored = handle.store.write_bytes(f"{layout.STATE_DICT_DIR}/{name}", data)
    else:
        stored = handle.store.write(f"{layout.STATE_DICT_DIR}/{name}", TorchSave(state))
    manifest = Manifest(
        kind="state_dict",
        files={name: stored},
        model=spec.describe_model(model, model_kwargs),
        epoch=epoch,
        step=step,
        format=format,
        versions=versions(),
        created_at=now(),
    )
    handle.store.write_bytes(layout.manifest_path(layout.STATE_DICT_DIR), manifest.to_json())
    # The new manifest is the commit: only now may the files of the state dict it replaces go.
    for old in previous - {name}:
        try:
            handle.store.delete(f"{layout.STATE_DICT_DIR}/{old}")
        except TrackingError:
            pass  # no manifest lists it any more: `tracking verify --clean` removes it
    return LoggedCheckpoint(handle.run_id, layout.STATE_DICT_DIR, manifest)


def _stored_state_dict_files(handle: RunHandle) -> set[str]:
    """The files the run's current state dict manifest lists (none when there is none, or it is unreadable)."""
    try:
        return set(layout.read_manifest(handle.store, layout.STATE_DICT_DIR).files)
    except (NotFoundError, IntegrityError):
        return set()


def _state_dict_file(format: str, stored: set[str]) -> str:
    """A file name for a state dict of ``format`` that the stored manifest does not list.

    A re-log must not overwrite the bytes the current manifest points at: killed between its
    data and its manifest, it would leave that manifest naming bytes that no longer match. The
    name alternates between ``state_dict.pt`` and ``state_dict.1.pt`` (``.safetensors`` alike).
    """
    name = layout.STATE_DICT_FILES[format]
    if name not in stored:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.1.{suffix}"


def log_model(
    model: nn.Module,
    *,
    run_id: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    registered_model_name: str | None = None,
    allow_mixed: bool = False,
    **mlflow_kwargs: Any,
) -> Any:
    """Log the whole model with MLflow's pytorch flavor, loadable as ``runs:/<id>/model``.

    How to rebuild it without unpickling (class path and init kwargs) is recorded in
    the logged model's metadata under ``"tracking"``. Returns MLflow's ``ModelInfo``.
    A ``registered_model_name`` whose versions are checkpoints is refused before anything is
    logged, unless ``allow_mixed``: what loads ``models:/<name>@<alias>`` would then depend on
    which kind the alias names.
    """
    import mlflow

    from tracking.flavor import pytorch_flavor

    check_model(model)
    if registered_model_name is not None:
        check_model_name(registered_model_name)
    model = distributed.unwrap(model)
    description = spec.describe_model(model, model_kwargs)
    handle = open_run(target_run_id(run_id))
    _refuse_sharded(handle, model.state_dict(), "log_model")
    if registered_model_name is not None and not allow_mixed:
        with tracking_server_errors(handle.run_id, f"listing the versions of {registered_model_name!r}"):
            refuse_mixed(
                handle.client,
                registered_model_name,
                "a whole model",
                checkpoint=False,
                escape="allow_mixed=True to tracking.log_model",
            )
    # Create the logged model in the run's own experiment: MLflow would otherwise put it in
    # the active (or default) experiment, where runs:/<id>/model does not look.
    logged = mlflow.initialize_logged_model(
        name=layout.MODEL_NAME, source_run_id=handle.run_id, experiment_id=handle.experiment_id
    )
    return pytorch_flavor().log_model(
        model,
        name=layout.MODEL_NAME,
        run_id=handle.run_id,
        model_id=logged.model_id,
        registered_model_name=registered_model_name,
        metadata={"tracking": {"model": description, "format_version": FORMAT_VERSION}},
        # The whole module pickled, as torch.save(model) does; MLflow's newer default, pt2,
        # needs an input example.
        **{"serialization_format": "pickle", **mlflow_kwargs},
    )


def _refuse_sharded(handle: RunHandle, state: Mapping[str, Any], what: str) -> None:
    """Refuse a sharded (FSDP2) model's state for a log that stores one process's file: it would never load."""
    if distributed.is_sharded(state):
        raise ValueError(
            f"run {handle.run_id}: {what} stores the model of one process, but this model is sharded (FSDP2) "
            "across the ranks: one rank's shards would never load. Log it with tracking.log_checkpoint(model, "
            "optimizer, epoch=...) on every rank (a sharded checkpoint, which tracking.load_model reads as a "
            "whole model in any process), or gather its full weights (get_model_state_dict with "
            "full_state_dict=True) into a plain model and log that."
        )
