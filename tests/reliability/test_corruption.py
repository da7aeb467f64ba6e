"""Promise: "Every corruption is detected before ``torch.load``" (and "no torn checkpoint is ever loaded").

Each test commits two checkpoints on the real stack, then damages the second one in the bucket
with boto3, as a faulty disk, a bad copy or a careless hand would: a flipped byte (in the middle
of a multipart file, and its last byte), a file one byte shorter or longer, a deleted file, and a
manifest that is garbage, cut, empty, not an object, lying about the sha256 or the size, deleted,
or swapped with the other checkpoint's. Loading it must raise IntegrityError (NotFoundError when
a file is gone) without ever reaching ``torch.load``; "latest" never returns damaged weights;
``verify`` (and ``tracking verify``) names the damage; the other checkpoint still loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

import tracking
from tests.reliability import invariants, workload
from tracking import cli as tracking_cli
from tracking import layout
from tracking.audit import verify
from tracking.errors import IntegrityError, NotFoundError
from tracking.localstack import LocalStack


def _flip(offset: Callable[[int], int]) -> Callable[[bytes], bytes]:
    def flip(data: bytes) -> bytes:
        at = offset(len(data))
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]

    return flip


def _edit_files(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        manifest = json.loads(data)
        for entry in manifest["files"].values():
            change(entry)
        return json.dumps(manifest).encode()

    return edit


def _set_sha(entry: dict[str, Any]) -> None:
    entry["sha256"] = "0" * 64


def _grow_size(entry: dict[str, Any]) -> None:
    entry["size"] += 1


DELETE = None
# name -> (damaged file: "data" | "manifest" | "both manifests", new content from old, None: delete it, error)
CORRUPTIONS: dict[str, tuple[str, Callable[[bytes], bytes] | None, type[Exception]]] = {
    "data-byte-flipped-mid-part-2": ("data", _flip(lambda n: n // 2), IntegrityError),
    "data-last-byte-flipped": ("data", _flip(lambda n: n - 1), IntegrityError),
    "data-truncated-by-1": ("data", lambda data: data[:-1], IntegrityError),
    "data-extended-by-1": ("data", lambda data: data + b"\0", IntegrityError),
    "data-deleted": ("data", DELETE, NotFoundError),
    "manifest-garbage": ("manifest", lambda data: os.urandom(len(data)), IntegrityError),
    "manifest-cut-in-half": ("manifest", lambda data: data[: len(data) // 2], IntegrityError),
    "manifest-empty": ("manifest", lambda data: b"", IntegrityError),
    "manifest-not-an-object": ("manifest", lambda data: b"[]", IntegrityError),
    "manifest-wrong-sha256": ("manifest", _edit_files(_set_sha), IntegrityError),
    "manifest-wrong-size": ("manifest", _edit_files(_grow_size), IntegrityError),
    "manifest-deleted": ("manifest", DELETE, NotFoundError),
    "manifests-swapped": ("both manifests", None, IntegrityError),
}


def _key(artifact_uri: str, path: str) -> tuple[str, str]:
    """The bucket and object key of ``path`` in a checkpoint's logged model location (``s3://...``)."""
    assert artifact_uri.startswith("s3://"), artifact_uri
    bucket, _, prefix = artifact_uri[len("s3://") :].partition("/")
    return bucket, f"{prefix.rstrip('/')}/{path}"


def _get(stack: LocalStack, artifact_uri: str, path: str) -> bytes:
    bucket, key = _key(artifact_uri, path)
    return bytes(stack.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def _put(stack: LocalStack, artifact_uri: str, path: str, data: bytes | None) -> None:
    bucket, key = _key(artifact_uri, path)
    if data is None:
        stack.s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        stack.s3_client().put_object(Bucket=bucket, Key=key, Body=data)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_detected_before_torch_load(
    name: str, stack: LocalStack, new_run: Callable[[], str], small_parts: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, damage, error = CORRUPTIONS[name]
    # A data file worth damaging spans several 5 MB parts; manifests are checked on small ones.
    hidden = workload.BIG if target == "data" else workload.SMALL
    run_id = new_run()
    first = workload.log(run_id, 1, hidden=workload.SMALL)
    logged = workload.log(run_id, 2, hidden=hidden)
    expected = {1: [workload.model_state(1, workload.SMALL)], 2: [workload.model_state(2, hidden)]}
    # Each checkpoint's files are at the root of its own logged model's location; verify names them
    # "<checkpoint name> (<model ID>)/<file>".
    where = {1: str(first.artifact_uri), 2: str(logged.artifact_uri)}
    folders = {1: invariants.part_label(first.path, str(first.model_id))}
    folders[2] = invariants.part_label(logged.path, str(logged.model_id))
    manifest, data = layout.MANIFEST_FILE, next(iter(logged.manifest.files))
    assert (manifest, data) == ("manifest.json", "checkpoint.pt")

    if target == "data":
        _put(stack, where[2], data, damage and damage(_get(stack, where[2], data)))
    elif target == "manifest":
        _put(stack, where[2], manifest, damage and damage(_get(stack, where[2], manifest)))
    else:
        one, two = _get(stack, where[1], manifest), _get(stack, where[2], manifest)
        _put(stack, where[1], manifest, two)
        _put(stack, where[2], manifest, one)
    damaged = [2, 1] if target == "both manifests" else [2]

    models = {1: first.model_id, 2: logged.model_id}
    for epoch in damaged:
        for source, selector in ((run_id, epoch), (f"models:/{models[epoch]}", "latest")):
            with invariants.watching_torch_load(monkeypatch) as unpickled:
                with pytest.raises(error):
                    tracking.load(source, selector)
            assert not unpickled, f"{source} epoch {epoch} ({name}) reached torch.load before the damage was found"

    # "latest" names the damaged checkpoint: it must refuse it, or fall back to an intact one.
    with invariants.watching_torch_load(monkeypatch) as unpickled:
        try:
            loaded = tracking.load(run_id)
        except (IntegrityError, NotFoundError):
            assert not unpickled, f"load(run) ({name}) reached torch.load before the damage was found"
        else:
            assert loaded.epoch not in damaged or name == "manifest-deleted", f"load(run) returned damaged {name}"
            assert workload.same_state(loaded.model.state_dict(), expected[loaded.epoch][0])

    report = verify(run_id)
    problems = {path: problem for path, problem in report.items() if problem is not None}
    cli = CliRunner().invoke(tracking_cli.main, ["verify", run_id])
    if name == "manifest-deleted":
        # Without its manifest the checkpoint does not exist: nothing is damaged, nothing is missing.
        assert not problems, problems
        assert invariants.committed(run_id) == [1]
        assert folders[2] in {leftover.path for leftover in report.leftovers}, report.leftovers
        assert cli.exit_code == 0, cli.output
    else:
        for epoch in damaged:
            assert any(path.startswith(folders[epoch] + "/") for path in problems), (
                f"verify did not report the damage to epoch {epoch} ({name}): {report}"
            )
        assert cli.exit_code == 1, f"`tracking verify` exited {cli.exit_code} on {name}: {cli.output}"
    if 1 not in damaged:
        previous = tracking.load(run_id, 1)
        assert workload.same_state(previous.model.state_dict(), expected[1][0]), "the intact checkpoint changed"
