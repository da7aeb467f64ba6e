"""Sharded checkpoints (FSDP2, DTensor): every rank streams its own shard file to the store.

A sharded checkpoint is written with ``torch.distributed.checkpoint`` (DCP) through
:class:`~tracking.parallel.dcp_storage.ShardWriter`, which streams each rank's items into one file of the checkpoint's
logged model, ``shard-<rank>.distcp``, straight from tensor memory (no local file, no
gather to one rank). What DCP would pickle as its ``.metadata`` is stored as JSON instead,
``dcp.json`` (which tensor chunk or value is where), so reading it runs no code. Rank 0
lists every file with its sha256 in the manifest (kind ``sharded_checkpoint``, format
``dcp``) once all ranks stored theirs: the manifest is still the commit.

Reading verifies each file it needs against the manifest, then lets DCP copy the chunks
into the state dict being loaded, whatever the number of ranks (DCP reshards); values that
are not tensors load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from tracking import catalog
from tracking.catalog import LoggedCheckpoint, StoredCheckpoint
from tracking.commit import commit_files
from tracking.config import TrackingConfig
from tracking.errors import MismatchError, StorageError, TrackingError, one_line
from tracking.manifest import StoredFile
from tracking.parallel import dcp_index, distributed
from tracking.parallel.dcp_index import METADATA_FILE
from tracking.parallel.dcp_storage import SafeFullPlanner, SafeLoadPlanner, ShardReader, ShardWriter
from tracking.parallel.dcp_storage import shard_file as shard_file  # re-exported: a sharded checkpoint's file names
from tracking.run import RunHandle
from tracking.storage import ArtifactStore, open_store

# A rank and the error it met.
Failure = tuple[int, BaseException]


def write_shards(writer: ShardWriter, state: dict[str, Any]) -> None:
    """Every rank's part of ``state`` into its shard file: ``writer.stored`` says what this rank stored
    (even when another rank failed), ``writer.metadata`` on rank 0 where all of it is. Collective."""
    from torch.distributed.checkpoint.state_dict_saver import save

    with _quiet():  # one process of its own (no process group): DCP says it saves as one process
        save(
            state,
            storage_writer=writer,
            # A value every rank holds (a buffer, the optimizer's step) is written by the lowest rank:
            # rank 0's copy, as a replicated model's checkpoint holds.
            planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True),
            process_group=distributed.group() if distributed.initialised() else None,
            no_dist=not distributed.initialised(),
        )


def commit_sharded(
    handle: RunHandle | None,
    snapshot: Any,
    describe: Any = None,
    after: Callable[[LoggedCheckpoint], object] | None = None,
    config: TrackingConfig | None = None,
) -> LoggedCheckpoint:
    """Commit a sharded checkpoint: every rank calls it, rank 0 with the run's ``handle``, every rank with the
    ``config`` it was given (None: the environment's), which says how to reach the store.

    Rank 0 creates the logged model (PENDING) and hands its artifact location to every rank;
    every rank stores its shard file there; rank 0 then writes ``dcp.json`` and the manifest
    listing every file, marks the model READY and moves the run's tags through
    :func:`tracking.commit.commit_files`, and calls ``after`` (retention). Every rank returns
    the committed checkpoint, or raises the same error.
    """

    manifest = snapshot.manifest
    created: list[StoredCheckpoint] = []

    def create() -> tuple[str, str]:
        assert handle is not None
        checkpoint = catalog.create(handle, manifest)
        created.append(checkpoint)
        return checkpoint.artifact_uri, checkpoint.store.owner

    artifact_uri, owner = distributed.on_rank0(create)
    failure: Failure | None = None  # the first failing rank and its error, the same on every rank
    stored: dict[str, StoredFile] = {}
    metadata = None
    store = None
    try:
        # The config the caller gave every rank (its endpoint, its credentials), not the environment's alone.
        own = handle.config if handle is not None else config or TrackingConfig.from_env()
        store = open_store(artifact_uri, own, owner=owner)
    except Exception as exc:
        failure = (distributed.rank(), distributed.portable(exc))
    # Every rank learns whether any failed: one that writes its shard while another does not would wait in DCP's
    # collectives for it, while the others went on to the next step.
    failure = next((found for found in distributed.every(failure) if found is not None), None)
    if failure is None:
        assert store is not None
        writer = ShardWriter(store)
        try:
            write_shards(writer, snapshot.payload)
        except BaseException as exc:
            rank, error = _dcp_failure(exc)
            failure = (rank, distributed.portable(error))
        stored, metadata = writer.stored, writer.metadata
    outcomes = distributed.gather((stored, failure))

    def commit() -> LoggedCheckpoint:
        assert handle is not None and outcomes is not None
        checkpoint = created[0]
        files: dict[str, StoredFile] = {}
        failures = []
        for rank_files, rank_failure in outcomes:
            files.update(rank_files)
            if rank_failure is not None:
                failures.append(rank_failure)

        def write_files() -> dict[str, StoredFile]:
            if failures:
                for name in files:
                    checkpoint.store.delete(name)  # this save's shards, so no data stays behind
                rank, failure = min(failures, key=lambda found: found[0])
                if isinstance(failure, TrackingError):
                    raise type(failure)(f"rank {rank}: {failure}") if isinstance(failure, StorageError) else failure
                raise StorageError(f"rank {rank} could not store its shard ({type(failure).__name__}: {failure}).")
            assert metadata is not None
            files[METADATA_FILE] = checkpoint.store.write_bytes(METADATA_FILE, dcp_index.to_json(metadata))
            return files

        logged = commit_files(handle, checkpoint, snapshot, write_files, describe)
        if after is not None:
            after(logged)
        return logged

    return distributed.on_rank0(commit)


def _dcp_failure(exc: BaseException) -> Failure:
    """The failing rank and its error, out of DCP's CheckpointException (which carries every rank's, by rank, on
    every rank); else this rank's own ``exc``."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, CheckpointException):
        for rank, (inner, _trace) in sorted(exc.failures.items()):
            return rank, inner if isinstance(inner, Exception) else TrackingError(str(inner))
        return distributed.rank(), TrackingError(str(exc))
    if not isinstance(exc, Exception):
        raise exc
    return distributed.rank(), exc


def _dcp_error(exc: BaseException) -> BaseException:
    """The error a rank met, out of DCP's CheckpointException (which carries every rank's)."""
    return _dcp_failure(exc)[1]


def read_full(store: ArtifactStore, files: Mapping[str, StoredFile], where: str, named: bool = False) -> dict[str, Any]:
    """The whole checkpoint dict with full tensors, in this one process: what ``checkpoint.pt`` would hold.

    The optimizer state (each one's, when ``named``: several by name), saved by parameter name, comes back
    keyed by index as ``Optimizer.load_state_dict`` takes it.
    """
    state = read(store, files, where)
    saved = state.get("optim_state")
    if isinstance(saved, dict):
        if named:
            state["optim_state"] = {name: index_keyed(one) for name, one in saved.items() if isinstance(one, dict)}
        else:
            state["optim_state"] = index_keyed(saved)
    return state


def read(
    store: ArtifactStore, files: Mapping[str, StoredFile], where: str, keys: set[str] | None = None
) -> dict[str, Any]:
    """Top-level ``keys`` (all when None) of a sharded checkpoint, as saved, with full tensors."""
    return _read_with(ShardReader(store, files, where), where, keys)


def _read_with(reader: ShardReader, where: str, keys: set[str] | None) -> dict[str, Any]:
    """:func:`read` through ``reader``, which keeps the index it read already: ``dcp.json`` is read once a load."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    planner = SafeFullPlanner(keys=keys)
    reader.read_metadata()  # its IntegrityError as it is, not inside DCP's CheckpointException
    with _own_errors(where):
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    return state


@contextlib.contextmanager
def _own_errors(where: str, mismatch: bool = False) -> Iterator[None]:
    """A TrackingError raised inside DCP's load as itself (naming ``where``), not as a CheckpointException;
    ``mismatch``: any other error of the load (a key the objects loaded into hold and the checkpoint does not, a
    shape) as a MismatchError. A CheckpointException is no Exception: ``except Exception`` would not catch it."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        inner = _dcp_error(exc)
        if not isinstance(inner, TrackingError):
            if mismatch:
                raise _mismatch(where, one_line(inner)) from None
            raise
        raise type(inner)(str(inner) if str(inner).startswith(where) else f"{where}: {inner}") from None


def _mismatch(where: str, found: str) -> MismatchError:
    return MismatchError(
        f"{where} does not fit the sharded model or optimizer given ({found[:500]}); "
        "build them as the run that saved it did."
    )


def index_keyed(optim_state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (DCP's) keyed by index instead (``Optimizer``'s)."""
    index: dict[Any, int] = {}
    groups = []
    for group in optim_state.get("param_groups", []):
        params = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            params.append(index[name])
        groups.append({**group, "params": params})
    state = {index[name]: value for name, value in optim_state.get("state", {}).items() if name in index}
    return {"state": state, "param_groups": groups}


def name_keyed(optim_state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict keyed by index (``Optimizer``'s) keyed by parameter name instead (DCP's).

    The saved indices pair with ``optimizer``'s parameters in order, as ``Optimizer.load_state_dict`` pairs them.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    live = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    saved = [index for group in optim_state["param_groups"] for index in group["params"]]
    if len(saved) != len(live):
        raise ValueError(f"the checkpoint's optimizer holds {len(saved)} parameters, the optimizer given {len(live)}")
    name_of = dict(zip(saved, live, strict=True))
    groups = [{**g, "params": [name_of[index] for index in g["params"]]} for g in optim_state["param_groups"]]
    return {"state": {name_of[index]: value for index, value in optim_state["state"].items()}, "param_groups": groups}


def load_whole_into(model: nn.Module, optimizer: Any, state: Mapping[str, Any], strict: bool, *, where: str) -> None:
    """A whole model's checkpoint (``checkpoint.pt``: full tensors, optimizer keyed by index) into a sharded
    model and its optimizer (or optimizers by name, the checkpoint's names): every rank holds the full state and
    keeps its own shards of it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=strict)
    try:
        set_model_state_dict(model, state["model_state"], options=options)
        if optimizer is not None and state.get("optim_state") is not None:
            for one, saved in _pairs(optimizer, state["optim_state"]):
                set_optimizer_state_dict(model, one, name_keyed(saved, model, one), options=options)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise _mismatch(where, one_line(exc)) from exc


def load_into(
    store: ArtifactStore,
    files: Mapping[str, StoredFile],
    where: str,
    model: Any,
    optimizer: Any,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a sharded checkpoint into live (sharded or plain) objects on this rank; the other saved values.

    Each rank reads the chunks its own shards overlap, so a checkpoint of N ranks loads into M.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    reader = ShardReader(store, files, where)
    # Its IntegrityError as it is, not inside DCP's CheckpointException; each saved value's path in the state dict.
    paths = {tuple(path) for path in reader.read_metadata().planner_data.values()}
    options = StateDictOptions(strict=strict)
    template: dict[str, Any] = {"model_state": get_model_state_dict(model, options=options)}
    # Saved without one (its optim_state a None): the model alone, as from checkpoint.pt.
    if optimizer is not None and any(path[0] == "optim_state" and len(path) > 1 for path in paths):
        # Several optimizers by name (the checkpoint's names) are each saved under theirs.
        template["optim_state"] = (
            {name: get_optimizer_state_dict(model, one, options=options) for name, one in optimizer.items()}
            if isinstance(optimizer, Mapping)
            else get_optimizer_state_dict(model, optimizer, options=options)
        )
    _refuse_left_over(where, template, paths, strict)
    with _quiet(), _own_errors(where, mismatch=True):  # each rank reads the chunks it needs: no collective
        load(template, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    try:
        set_model_state_dict(model, template["model_state"], options=options)
        if "optim_state" in template:
            for one, state in _pairs(optimizer, template["optim_state"]):
                set_optimizer_state_dict(model, one, state, options=options)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise _mismatch(where, one_line(exc)) from exc
    saved = {str(path[0]) for path in paths}
    return _read_with(reader, where, saved - {"model_state", "optim_state"})


def _refuse_left_over(where: str, template: dict[str, Any], paths: set[tuple[Any, ...]], strict: bool) -> None:
    """Raise MismatchError when the checkpoint holds weights (``strict``) or optimizer states that nothing in
    ``template`` takes: DCP loads what the template asks for, and would leave those out without a word."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    _, mappings = flatten_state_dict(template)
    wanted = {tuple(path) for path in mappings.values()}
    roles = {"optim_state"} | ({"model_state"} if strict else set())
    # An optimizer's param_groups hold its settings (initial_lr once a scheduler ran): those follow the live one.
    left = sorted(
        ".".join(str(part) for part in path)
        for path in paths
        if path[0] in roles and path[0] in template and "param_groups" not in path[1:3] and path not in wanted
    )
    if left:
        shown = ", ".join(left[:5]) + (f", ... ({len(left)} in all)" if len(left) > 5 else "")
        hint = "" if left[0].startswith("optim_state") else " (or pass strict=False to load the weights that match)"
        raise MismatchError(
            f"{where} holds {shown}, which the sharded model or optimizer given has no place for: restoring it "
            f"would leave them out. Build them as the run that saved it did{hint}."
        )


def _pairs(optimizer: Any, saved: Any) -> list[tuple[torch.optim.Optimizer, Any]]:
    """Each optimizer with its saved state: one and one, or by name."""
    if isinstance(optimizer, Mapping):
        return [(one, saved[name]) for name, one in optimizer.items()]
    return [(optimizer, saved)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
