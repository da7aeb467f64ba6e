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

from tracking.errors import IntegrityError
from tracking.parallel import dcp_index
from tracking.parallel.dcp_index import Span

# Each file the manifest lists, with its size: the index's spans must fit in them.
FILES = {"shard-00000.distcp": 124, "shard-00001.distcp": 24, "dcp.json": 1000}


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
    # Well-formed, but not a whole tensor: a load would leave memory unwritten, or index outside it.
    "a chunk missing": lambda d: d["entries"][0]["chunks"].pop(),
    "a chunk outside its tensor": lambda d: _chunk(d).update(offsets=[3, 0]),
    "two chunks over the same rows": lambda d: d["entries"][0]["chunks"][1].update(offsets=[1, 0]),
    "a tensor bigger than its files": lambda d: d["entries"][0].update(size=[200000, 200000]),
    "a chunk bigger than its file": lambda d: _chunk(d).update(sizes=[200000, 200000], length=200000 * 200000 * 4),
    "a span past the end of its file": lambda d: _value(d).update(offset=25),
    "two items in the same bytes": lambda d: d["entries"][0]["chunks"][1].update(file="shard-00000.distcp"),
    "a negative dimension": lambda d: d["entries"][0].update(size=[-4, 3]),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_index_is_an_integrity_error_naming_where(edit: str) -> None:
    with pytest.raises(IntegrityError, match=r"^run r: epoch 3: dcp\.json is malformed .*load another checkpoint"):
        dcp_index.from_json(_edited(EDITS[edit]), FILES, where="run r: epoch 3: dcp.json")


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'{"format": "dcp"}', b"\xff\xfe"])
def test_what_is_not_an_index_is_an_integrity_error(raw: bytes) -> None:
    with pytest.raises(IntegrityError, match=r"^run r: dcp\.json is malformed"):
        dcp_index.from_json(raw, FILES, where="run r: dcp.json")


# ------------------------------------------------ a stored sharded checkpoint whose index was edited


def _sharded_checkpoint(run_id: str) -> None:
    """A sharded checkpoint (DCP's files, dcp.json, manifest) of one process, as a rank-0-of-1 save makes it."""
    from dataclasses import replace

    from pipelines.models import Model
    from tracking.checkpoint import snapshot_checkpoint
    from tracking.manifest import SHARDED_KIND
    from tracking.parallel.sharded import commit_sharded
    from tracking.run import open_run

    snapshot = snapshot_checkpoint(Model(6), None, epoch=1)
    snapshot.manifest = replace(snapshot.manifest, kind=SHARDED_KIND, format="dcp")
    commit_sharded(open_run(run_id), snapshot)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda entry: entry["chunks"].clear(), id="its chunk missing"),
        pytest.param(lambda entry: entry["chunks"][0].update(offsets=[1, 0]), id="a chunk outside its tensor"),
        pytest.param(lambda entry: entry.update(size=[200000, 200000]), id="a 200000x200000 tensor"),
    ],
)
def test_a_stored_index_that_does_not_tile_its_tensor_fails_load_and_verify(experiment: str, edit: Any) -> None:
    import hashlib

    import mlflow

    import tracking
    from tests.unit.test_loader import rewrite, tamper_manifest
    from tracking import audit

    with mlflow.start_run() as run:
        _sharded_checkpoint(run.info.run_id)
    assert tracking.load(run.info.run_id).epoch == 1
    edited: dict[str, bytes] = {}

    def change(raw: bytes) -> bytes:
        document = json.loads(raw)
        edit(next(e for e in document["entries"] if e["fqn"] == "model_state.linear.weight"))
        edited["raw"] = json.dumps(document).encode()
        return edited["raw"]

    rewrite(run.info.run_id, 1, dcp_index.METADATA_FILE, change)
    # Its digest updated too: only the index checked against itself can tell.
    digest = {"size": len(edited["raw"]), "sha256": hashlib.sha256(edited["raw"]).hexdigest()}
    tamper_manifest(run.info.run_id, 1, lambda m: m["files"].update({dcp_index.METADATA_FILE: digest}))

    where = rf"^run {run.info.run_id}: checkpoint-epoch-0001 \(m-[0-9a-f]+\): dcp\.json is malformed"
    with pytest.raises(IntegrityError, match=where):
        tracking.load(run.info.run_id)
    failures = audit.verify(run.info.run_id).failures
    assert list(failures) == [f"checkpoint-epoch-0001 ({tracking.find_checkpoint(run.info.run_id).model_id})/dcp.json"]
    assert "model_state.linear.weight" in next(iter(failures.values()))


def test_a_restore_of_a_sharded_checkpoint_reads_its_index_once(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    import tracking
    from pipelines.models import Model

    with mlflow.start_run() as run:
        _sharded_checkpoint(run.info.run_id)
    parsed: list[str] = []
    parse = dcp_index.from_json

    def counted(raw: bytes, files: Any, *, where: str) -> Metadata:
        parsed.append(where)
        return parse(raw, files, where=where)

    monkeypatch.setattr(dcp_index, "from_json", counted)
    tracking.restore(run.info.run_id, Model(6))
    assert len(parsed) == 1, parsed


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, ("echo pwned",))


def test_a_malicious_value_in_a_shard_is_refused_naming_the_checkpoint_without_torchs_advice(
    s3_experiment: str,
) -> None:
    import hashlib
    import io

    import mlflow

    import tracking
    from tests.unit.test_loader import rewrite, tamper_manifest
    from tracking.parallel.sharded import shard_file

    with mlflow.start_run() as run:
        _sharded_checkpoint(run.info.run_id)
    buffer = io.BytesIO()
    torch.save(_Evil(), buffer)
    evil = buffer.getvalue()
    shard = shard_file(0)
    shard_bytes: dict[str, bytes] = {}

    def append_evil(raw: bytes) -> bytes:
        shard_bytes["raw"] = raw + evil
        return shard_bytes["raw"]

    rewrite(run.info.run_id, 1, shard, append_evil)
    index: dict[str, bytes] = {}

    def point_epoch_at_it(raw: bytes) -> bytes:
        document = json.loads(raw)
        entry = next(e for e in document["entries"] if e["fqn"] == "epoch")
        entry.update(file=shard, offset=len(shard_bytes["raw"]) - len(evil), length=len(evil))
        index["raw"] = json.dumps(document).encode()
        return index["raw"]

    rewrite(run.info.run_id, 1, dcp_index.METADATA_FILE, point_epoch_at_it)

    def digests(manifest: dict[str, Any]) -> None:
        for name, raw in ((shard, shard_bytes["raw"]), (dcp_index.METADATA_FILE, index["raw"])):
            manifest["files"][name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}

    tamper_manifest(run.info.run_id, 1, digests)
    with pytest.raises(IntegrityError) as caught:
        tracking.load(run.info.run_id)
    message = str(caught.value)
    assert message.startswith(f"run {run.info.run_id}: checkpoint-epoch-0001 (")
    assert "GLOBAL posix.system" in message or "GLOBAL os.system" in message
    assert "Re-running" not in message and "weights_only" not in message
