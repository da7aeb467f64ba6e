"""dcp.json, a sharded checkpoint's index as JSON: what DCP's Metadata says survives the round trip,
and a malformed or edited index is an IntegrityError before any shard is read."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from tracking import dcp_index
from tracking.dcp_index import Span
from tracking.errors import IntegrityError

FILES = {"shard-00000.distcp", "shard-00001.distcp", "dcp.json"}


def two_shard_metadata() -> Metadata:
    """A 4x3 float32 weight in two row chunks, one per rank's file, and a step counter stored as bytes."""
    weight = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32),
        torch.Size([4, 3]),
        [
            ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3])),
            ChunkStorageMetadata(offsets=torch.Size([2, 0]), sizes=torch.Size([2, 3])),
        ],
    )
    spans = {
        MetadataIndex("model.weight", torch.Size([0, 0])): Span("shard-00000.distcp", 0, 24, "float32", (2, 3)),
        MetadataIndex("model.weight", torch.Size([2, 0])): Span("shard-00001.distcp", 0, 24, "float32", (2, 3)),
        MetadataIndex("optim.step"): Span("shard-00000.distcp", 24, 100),
    }
    return Metadata(
        state_dict_metadata={"model.weight": weight, "optim.step": BytesStorageMetadata()},
        planner_data={"model.weight": ("model", "weight"), "optim.step": ("optim", "state", 0, "step")},
        storage_data=spans,
    )


def test_the_index_survives_the_round_trip() -> None:
    metadata = two_shard_metadata()

    back = dcp_index.from_json(dcp_index.to_json(metadata), FILES, where="run r: dcp.json")

    assert back.state_dict_metadata == metadata.state_dict_metadata
    assert back.storage_data == metadata.storage_data
    assert back.planner_data == metadata.planner_data


def _edited(change: Any) -> bytes:
    document = json.loads(dcp_index.to_json(two_shard_metadata()))
    change(document)
    return json.dumps(document).encode()


def _chunk(document: dict[str, Any]) -> dict[str, Any]:
    return next(entry for entry in document["entries"] if "chunks" in entry)["chunks"][0]


def _value(document: dict[str, Any]) -> dict[str, Any]:
    return next(entry for entry in document["entries"] if "chunks" not in entry)


EDITS = {
    "a newer version": lambda d: d.update(version=2),
    "another format": lambda d: d.update(format="pickle"),
    "a file the manifest does not list": lambda d: _chunk(d).update(file="../../etc/passwd"),
    "a negative offset": lambda d: _value(d).update(offset=-1),
    "a length that is not the chunk's bytes": lambda d: _chunk(d).update(length=23),
    "an unknown dtype": lambda d: d["entries"][0].update(dtype="float128"),
    "a dtype that names no dtype": lambda d: d["entries"][0].update(dtype="Tensor"),
    "a bool for an integer": lambda d: _value(d).update(length=True),
    "a chunk of another rank": lambda d: _chunk(d).update(sizes=[2, 3, 1]),
    "an empty path": lambda d: d["entries"][0].update(path=[]),
    "a missing key": lambda d: _value(d).pop("offset"),
    "entries that are not a list": lambda d: d.update(entries=7),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_index_is_an_integrity_error_naming_where(edit: str) -> None:
    with pytest.raises(IntegrityError, match=r"^run r: epoch 3: dcp\.json is malformed .*load another checkpoint"):
        dcp_index.from_json(_edited(EDITS[edit]), FILES, where="run r: epoch 3: dcp.json")


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'{"format": "dcp"}', b"\xff\xfe"])
def test_what_is_not_an_index_is_an_integrity_error(raw: bytes) -> None:
    with pytest.raises(IntegrityError, match=r"^run r: dcp\.json is malformed"):
        dcp_index.from_json(raw, FILES, where="run r: dcp.json")
