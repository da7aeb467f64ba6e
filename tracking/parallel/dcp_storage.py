"""DCP's storage for a sharded checkpoint: where ``torch.distributed.checkpoint`` writes and reads its bytes.

:class:`ShardWriter` streams each rank's items into one file of the checkpoint's logged model,
``shard-<rank>.distcp``, straight from tensor memory (no local file, no gather to one rank).
:class:`ShardReader` reads the index (``dcp.json``, :mod:`tracking.parallel.dcp_index`) in place of DCP's
pickled ``.metadata``, and verifies each file it needs against the manifest before DCP copies its
chunks; the planners load values that are not tensors with ``torch.load(weights_only=True)``.
What is saved and loaded, and the commit, are :mod:`tracking.parallel.sharded`'s.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner  # type: ignore[attr-defined]
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from tracking.errors import IntegrityError, load_refusal
from tracking.manifest import StoredFile
from tracking.parallel import dcp_index
from tracking.parallel.dcp_index import METADATA_FILE, NEXT_STEP, Span
from tracking.storage import ArtifactStore


def shard_file(rank: int) -> str:
    """The file that holds rank ``rank``'s items of a sharded checkpoint."""
    return f"shard-{rank:05d}.distcp"


class _ShardProducer:
    """Writes a rank's items one after the other; tensors go out from their own memory."""

    def __init__(self, items: list[tuple[WriteItem, Any]]) -> None:
        self.items = items
        self.spans: list[tuple[int, int]] = []

    @property
    def stable(self) -> list[tuple[int, int]]:
        ranges = []
        for _, data in self.items:
            if isinstance(data, torch.Tensor) and data.numel():
                storage = data.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return ranges

    def __call__(self, stream: BinaryIO) -> None:
        self.spans = []
        offset = 0
        for _, data in self.items:
            view = _bytes_of(data)
            if len(view):
                stream.write(view)
            self.spans.append((offset, len(view)))
            offset += len(view)


def _bytes_of(data: Any) -> memoryview:
    if isinstance(data, io.BytesIO):
        return data.getbuffer()
    tensor: torch.Tensor = data
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


class ShardWriter(StorageWriter):
    """A DCP storage writer streaming each rank's items into one file of ``store``."""

    def __init__(self, store: ArtifactStore) -> None:
        super().__init__()
        self.store = store
        self.stored: dict[str, StoredFile] = {}
        self.metadata: Metadata | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        self.stored, self.metadata = {}, None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(plan, storage_data=shard_file(rank)) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name: str = plan.storage_data
        items = []
        for item in plan.items:
            data: Any = planner.resolve_data(item)
            if item.type != WriteItemType.BYTE_IO:
                data = data.detach().to("cpu").contiguous()
            items.append((item, data))
        results = []
        if items:
            producer = _ShardProducer(items)
            self.stored[name] = self.store.write(name, producer)
            for (item, data), (offset, length) in zip(items, producer.spans, strict=True):
                span = Span(name, offset, length)
                if isinstance(data, torch.Tensor):
                    span = Span(name, offset, length, str(data.dtype).removeprefix("torch."), tuple(data.shape))
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=span))
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {result.index: result.storage_data for rank in results for result in rank}
        self.metadata = metadata

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


class ShardReader(StorageReader):
    """A DCP storage reader over a committed sharded checkpoint: each needed file is read once, verified."""

    def __init__(self, store: ArtifactStore, files: Mapping[str, StoredFile], where: str) -> None:
        super().__init__()
        self.store = store
        self.files = dict(files)
        self.where = where
        self.spans: dict[MetadataIndex, Span] = {}
        self.metadata: Metadata | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.metadata is None:
            if METADATA_FILE not in self.files:
                raise IntegrityError(f"{self.where}: the manifest lists no {METADATA_FILE}; {NEXT_STEP}")
            raw = self.store.read(METADATA_FILE, self.files[METADATA_FILE])
            self.metadata = dcp_index.from_json(
                bytes(raw), {name: f.size for name, f in self.files.items()}, where=f"{self.where}: {METADATA_FILE}"
            )
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.spans = dict(metadata.storage_data)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        needed = sorted({self.spans[item.storage_index].file for item in plan.items})
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(needed)))) as pool:
            buffers = dict(
                zip(needed, pool.map(lambda name: self.store.read(name, self.files[name]), needed), strict=True)
            )
        for item in plan.items:
            span = self.spans[item.storage_index]
            view = memoryview(buffers[span.file])[span.offset : span.offset + span.length]
            if len(view) != span.length:
                raise IntegrityError(f"{self.where}: {span.file} is shorter than {METADATA_FILE} says; {NEXT_STEP}")
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(bytes(view)))
                continue
            chunk = narrow_tensor_by_index(_tensor(view, span), item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if target.size() != chunk.size():
                raise IntegrityError(
                    f"{self.where}: {item.storage_index.fqn} is stored as {tuple(chunk.size())}, the state to load "
                    f"into needs {tuple(target.size())}; {NEXT_STEP}"
                )
            target.copy_(chunk)
            planner.commit_tensor(item, target)
        del buffers
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _tensor(view: memoryview, span: Span) -> torch.Tensor:
    assert span.dtype is not None and span.sizes is not None
    dtype = getattr(torch, span.dtype)
    if not span.length:
        return torch.empty(span.sizes, dtype=dtype)
    return torch.frombuffer(view, dtype=dtype).reshape(span.sizes)


def _safe_load(value: io.BytesIO, fqn: str) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise IntegrityError(
            f"{fqn} matches its file's sha256 but torch.load refused it ({load_refusal(exc)[:500]}): it holds "
            f"objects other than tensors and plain Python values, which may be code: do not unpickle it; {NEXT_STEP}"
        ) from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading values that are not tensors with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)


def _load_bytes(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    # DCP's own planners read these with weights_only=False, which could run code from the store.
    from torch.distributed.checkpoint._traverse import set_element

    loaded = _safe_load(value, read_item.dest_index.fqn)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
    else:
        planner.state_dict[read_item.dest_index.fqn] = loaded


class SafeFullPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the saved state dict (its top-level ``keys``, or all) from the metadata: full tensors."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)
