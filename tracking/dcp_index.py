"""``dcp.json``: where each item of a sharded checkpoint is, stored as JSON instead of DCP's pickle.

``torch.distributed.checkpoint`` keeps its index (which tensor chunk or value lies in which file,
at which offset) in a pickled ``.metadata`` file. A sharded checkpoint stores the same index as
JSON, so that reading it runs no code, and parses it strictly: an entry that names a file the
manifest does not list, a negative span, or a span whose length does not match its chunk's shape
and dtype is an :class:`IntegrityError` before any shard is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from tracking.errors import IntegrityError

FORMAT = "dcp"
METADATA_FILE = "dcp.json"
METADATA_VERSION = 1
NEXT_STEP = (
    "the checkpoint is corrupted or was edited; load another checkpoint (checkpoint=<epoch>) or log this one again."
)


@dataclass(frozen=True)
class Span:
    """Where one item's bytes are: a file, an offset and a length; a tensor chunk's dtype and shape too."""

    file: str
    offset: int
    length: int
    dtype: str | None = None
    sizes: tuple[int, ...] | None = None


def to_json(metadata: Metadata) -> bytes:
    """DCP's ``Metadata`` as the JSON document ``dcp.json`` holds."""
    entries = []
    for fqn, stored in metadata.state_dict_metadata.items():
        path = list(metadata.planner_data[fqn]) if metadata.planner_data else [fqn]
        if isinstance(stored, TensorStorageMetadata):
            chunks = []
            for chunk in stored.chunks:
                span = metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
                chunks.append(
                    {
                        "offsets": list(chunk.offsets),
                        "sizes": list(chunk.sizes),
                        "file": span.file,
                        "offset": span.offset,
                        "length": span.length,
                    }
                )
            dtype = str(stored.properties.dtype).removeprefix("torch.")
            entries.append({"fqn": fqn, "path": path, "dtype": dtype, "size": list(stored.size), "chunks": chunks})
        else:
            span = metadata.storage_data[MetadataIndex(fqn)]
            entries.append({"fqn": fqn, "path": path, "file": span.file, "offset": span.offset, "length": span.length})
    document = {"format": FORMAT, "version": METADATA_VERSION, "entries": entries}
    return json.dumps(document, indent=1, sort_keys=True).encode()


def from_json(raw: bytes, files: set[str], *, where: str) -> Metadata:
    """Parse ``dcp.json`` strictly: anything malformed is an IntegrityError naming ``where``."""
    try:
        document = json.loads(raw)
        if document.get("format") != FORMAT or document.get("version") != METADATA_VERSION:
            raise ValueError(f"format/version {document.get('format')!r}/{document.get('version')!r}")
        state: dict[str, Any] = {}
        planner_data: dict[str, Any] = {}
        spans: dict[MetadataIndex, Span] = {}
        for entry in document["entries"]:
            fqn = _typed(entry["fqn"], str)
            path = tuple(_typed(p, (str, int)) for p in entry["path"])
            if not path:
                raise ValueError(f"{fqn}: empty path")
            planner_data[fqn] = path
            if "chunks" in entry:
                dtype = getattr(torch, _typed(entry["dtype"], str), None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"{fqn}: dtype {entry['dtype']!r}")
                size = torch.Size(_ints(entry["size"]))
                chunks = []
                for chunk in entry["chunks"]:
                    offsets, sizes = torch.Size(_ints(chunk["offsets"])), torch.Size(_ints(chunk["sizes"]))
                    if len(offsets) != len(size) or len(sizes) != len(size):
                        raise ValueError(f"{fqn}: chunk of {len(sizes)} dimensions in a tensor of {len(size)}")
                    length = _span_fields(chunk, files)
                    itemsize = torch.empty((), dtype=dtype).element_size()
                    if length[2] != sizes.numel() * itemsize:
                        raise ValueError(f"{fqn}: {length[2]} bytes for a chunk of {tuple(sizes)} {dtype}")
                    spans[MetadataIndex(fqn, offsets)] = Span(*length, str(dtype).removeprefix("torch."), tuple(sizes))
                    chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
                state[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), size, chunks)
            else:
                spans[MetadataIndex(fqn)] = Span(*_span_fields(entry, files))
                state[fqn] = BytesStorageMetadata()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise IntegrityError(f"{where} is malformed ({exc}); {NEXT_STEP}") from exc
    return Metadata(state_dict_metadata=state, planner_data=planner_data, storage_data=spans)


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not a {kind}")
    return value


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list):
        raise TypeError(f"{values!r} is not a list")
    return [_typed(v, int) for v in values]


def _span_fields(entry: Mapping[str, Any], files: set[str]) -> tuple[str, int, int]:
    name = _typed(entry["file"], str)
    if name not in files:
        raise ValueError(f"file {name[:100]!r} is not in the manifest")
    offset, length = _typed(entry["offset"], int), _typed(entry["length"], int)
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length in {name}")
    return name, offset, length
