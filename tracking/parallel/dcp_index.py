"""``dcp.json``: where each item of a sharded checkpoint is, stored as JSON instead of DCP's pickle.

``torch.distributed.checkpoint`` keeps its index (which tensor chunk or value lies in which file,
at which offset) in a pickled ``.metadata`` file. A sharded checkpoint stores the same index as
JSON, so that reading it runs no code, and parses it strictly: an entry that names a file the
manifest does not list, a negative span, or a span whose length does not match its chunk's shape
and dtype is an :class:`IntegrityError` before any shard is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
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
# Bounds that keep a hostile index cheap to check: DCP writes one chunk per tensor per rank.
MAX_CHUNKS = 65_536
MAX_DIMENSIONS = 64
MAX_EXTENT = 2**62
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


def from_json(raw: bytes, files: Mapping[str, int], *, where: str) -> Metadata:
    """Parse ``dcp.json`` strictly: anything malformed is an IntegrityError naming ``where``.

    ``files`` is each file the manifest lists, with its size. Besides its form, the index is
    checked against itself before anything is allocated: every span lies within its file and
    the spans of a file add up to no more than its size, and each tensor's chunks lie within the
    tensor and tile it exactly (no gap, no overlap), so that a load never leaves memory unwritten.
    """
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
                if not isinstance(entry["chunks"], list) or len(entry["chunks"]) > MAX_CHUNKS:
                    raise ValueError(f"{fqn}: chunks is not a list of at most {MAX_CHUNKS}")
                for chunk in entry["chunks"]:
                    offsets, sizes = torch.Size(_ints(chunk["offsets"])), torch.Size(_ints(chunk["sizes"]))
                    if len(offsets) != len(size) or len(sizes) != len(size):
                        raise ValueError(f"{fqn}: chunk of {len(sizes)} dimensions in a tensor of {len(size)}")
                    # An empty chunk (a rank with no rows of a small tensor) holds nothing to place.
                    inside = all(o + n <= whole for o, n, whole in zip(offsets, sizes, size, strict=True))
                    if sizes.numel() and not inside:
                        raise ValueError(
                            f"{fqn}: chunk at {list(offsets)} of {list(sizes)} lies outside the tensor of {list(size)}"
                        )
                    length = _span_fields(chunk, files)
                    itemsize = torch.empty((), dtype=dtype).element_size()
                    if length[2] != sizes.numel() * itemsize:
                        raise ValueError(f"{fqn}: {length[2]} bytes for a chunk of {tuple(sizes)} {dtype}")
                    spans[MetadataIndex(fqn, offsets)] = Span(*length, str(dtype).removeprefix("torch."), tuple(sizes))
                    chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
                _check_tiling(fqn, size, chunks)
                state[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), size, chunks)
            else:
                spans[MetadataIndex(fqn)] = Span(*_span_fields(entry, files))
                state[fqn] = BytesStorageMetadata()
        _check_file_use(spans.values(), files)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise IntegrityError(f"{where} is malformed ({exc}); {NEXT_STEP}") from exc
    return Metadata(state_dict_metadata=state, planner_data=planner_data, storage_data=spans)


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not a {kind}")
    return value


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list) or len(values) > MAX_DIMENSIONS:
        raise TypeError(f"{str(values)[:100]} is not a list of at most {MAX_DIMENSIONS} integers")
    ints = [_typed(v, int) for v in values]
    if any(not 0 <= v <= MAX_EXTENT for v in ints):
        raise ValueError(f"{ints} holds a value outside 0..{MAX_EXTENT}")
    return ints


def _span_fields(entry: Mapping[str, Any], files: Mapping[str, int]) -> tuple[str, int, int]:
    name = _typed(entry["file"], str)
    if name not in files:
        raise ValueError(f"file {name[:100]!r} is not in the manifest")
    offset, length = _typed(entry["offset"], int), _typed(entry["length"], int)
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length in {name}")
    if offset + length > files[name]:
        raise ValueError(f"{length} bytes at offset {offset} of {name}, which has {files[name]} bytes")
    return name, offset, length


def _check_tiling(fqn: str, size: torch.Size, chunks: list[ChunkStorageMetadata]) -> None:
    """The chunks (each within the tensor) cover every element of the tensor exactly once."""
    covered = sum(chunk.sizes.numel() for chunk in chunks)
    if covered != size.numel():
        raise ValueError(f"{fqn}: its chunks hold {covered} elements of a tensor of {list(size)} ({size.numel()})")
    boxes = [(chunk.offsets, chunk.sizes) for chunk in chunks if chunk.sizes.numel()]
    if len(boxes) < 2:
        return
    # With every chunk inside the tensor and as many elements as it has, no overlap means an exact
    # tiling. Sweep along the dimension whose offsets differ most (the sharded one): each chunk is
    # then compared only with the few that start before it ends there.
    axis = max(range(len(size)), key=lambda d: len({offsets[d] for offsets, _ in boxes}))
    boxes.sort(key=lambda box: box[0][axis])
    for i, (offsets, sizes) in enumerate(boxes):
        for other_offsets, other_sizes in boxes[i + 1 :]:
            if other_offsets[axis] >= offsets[axis] + sizes[axis]:
                break
            if all(
                a < b + m and b < a + n for a, n, b, m in zip(offsets, sizes, other_offsets, other_sizes, strict=True)
            ):
                raise ValueError(f"{fqn}: chunks at {list(offsets)} and {list(other_offsets)} overlap")


def _check_file_use(spans: Iterable[Span], files: Mapping[str, int]) -> None:
    """The spans of each file add up to no more than its size: DCP never stores one byte for two items."""
    used: dict[str, int] = {}
    for span in spans:
        used[span.file] = used.get(span.file, 0) + span.length
    for name, total in used.items():
        if total > files[name]:
            raise ValueError(f"its items take {total} bytes of {name}, which has {files[name]} bytes")
