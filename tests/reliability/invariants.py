"""What must hold of a run after any fault, crash or corruption: the assertions this tier shares.

They read the run as a user would (``tracking.load``, ``tracking.audit.verify``) and the
bucket as an operator would (boto3 straight to the stack), with clients pointed straight at
the stack, never through a fault proxy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch

from tests.reliability import workload
from tracking import layout
from tracking.localstack import LocalStack

# epoch -> the model states some save of that epoch wrote (a re-log adds a second one)
Expected = Mapping[int, Sequence[Mapping[str, torch.Tensor]]]


def run_tags(run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.tags)


def committed(run_id: str) -> list[int]:
    from tracking.run import open_run

    return layout.committed_epochs(open_run(run_id).store)


def epoch_of_tag(tags: Mapping[str, str], tag: str) -> int | None:
    value = tags.get(tag)
    return None if value is None else layout.epoch_of(value)


def _check_loaded(loaded: Any, epoch: int, expected: Expected | None, how: str) -> None:
    assert loaded.epoch == epoch, f"{how}: loaded epoch {loaded.epoch}, expected {epoch}"
    if expected is None:  # weights not known here (a pipeline's): the manifest's sha256 vouches for them
        return
    candidates = expected.get(epoch, ())
    state = loaded.model.state_dict()
    assert any(workload.same_state(state, candidate) for candidate in candidates), (
        f"{how}: the weights loaded for epoch {epoch} are not what any save of epoch {epoch} wrote (torn checkpoint)"
    )


def assert_sound(run_id: str, expected: Expected | None) -> list[int]:
    """Every committed checkpoint loads (exactly as saved, when ``expected`` says what that was), the
    pointers name committed checkpoints, and verify finds every committed file intact.

    Returns the committed epochs.
    """
    import tracking
    from tracking.audit import verify
    from tracking.selection import find_checkpoint

    epochs = committed(run_id)
    tags = run_tags(run_id)
    latest = epoch_of_tag(tags, layout.TAG_LATEST)
    best = epoch_of_tag(tags, layout.TAG_BEST)
    if epochs or layout.TAG_LATEST in tags:
        assert latest in epochs, f"latest tag {tags.get(layout.TAG_LATEST)!r} names no committed checkpoint {epochs}"
        _check_loaded(tracking.load(run_id), latest, expected, "load(run) [latest]")
    if best is not None:
        assert best in epochs, f"best tag {tags.get(layout.TAG_BEST)!r} names no committed checkpoint {epochs}"
        if best == latest:  # loaded above already: only check that "best" resolves to it
            folder, manifest = find_checkpoint(run_id, "best")
            assert folder == layout.checkpoint_dir(best), f"'best' resolves to {folder}, its tag names epoch {best}"
        else:
            loaded_best = tracking.load(run_id, "best")
            _check_loaded(loaded_best, best, expected, "load(run, 'best')")
            manifest = loaded_best.manifest
        recorded = float(tags[layout.TAG_BEST_VALUE])
        monitor = tags[layout.TAG_MONITOR]
        assert manifest.metrics[monitor] == recorded, (
            f"best tag says {monitor}={recorded}, its checkpoint {best} has {manifest.metrics[monitor]}"
        )
    for epoch in epochs:
        if epoch not in (latest, best):
            _check_loaded(tracking.load(run_id, epoch), epoch, expected, f"load(run, {epoch})")
    report = verify(run_id)
    bad = {path: problem for path, problem in report.items() if problem is not None}
    assert not bad, f"verify found faults in committed files: {bad}"
    for epoch in epochs:
        folder = layout.checkpoint_dir(epoch) + "/"
        assert any(path.startswith(folder) for path in report), f"verify did not check committed {folder}: {report}"
    return epochs


# -- the bucket, seen by an operator ------------------------------------------------------------


def artifact_prefix(run_id: str) -> tuple[str, str]:
    """The bucket and key prefix (ending in /) of a run's artifact root."""
    from mlflow import MlflowClient

    uri = MlflowClient().get_run(run_id).info.artifact_uri
    assert uri.startswith("s3://"), uri
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.rstrip("/") + "/"


def stored(stack: LocalStack, run_id: str) -> list[str]:
    """Every object below the run's artifact root, as paths relative to it."""
    bucket, prefix = artifact_prefix(run_id)
    pages = stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", []))


def pending_uploads(stack: LocalStack, run_id: str) -> list[str]:
    """Multipart uploads begun below the run's artifact root and never completed or aborted."""
    bucket, prefix = artifact_prefix(run_id)
    listed = stack.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return sorted(upload["Key"][len(prefix) :] for upload in listed.get("Uploads", []))


def leftovers(stack: LocalStack, run_id: str) -> list[str]:
    """What saves that never committed left among the run's checkpoints: paths of objects no manifest
    lists, and of multipart uploads never completed or aborted."""
    from tracking.run import open_run

    store = open_run(run_id).store
    wanted: set[str] = set()
    for epoch in layout.committed_epochs(store):
        folder = layout.checkpoint_dir(epoch)
        wanted.add(layout.manifest_path(folder))
        wanted.update(f"{folder}/{name}" for name in layout.read_manifest(store, folder).files)
    under = layout.CHECKPOINTS_DIR + "/"
    stray = [path for path in stored(stack, run_id) if path.startswith(under) and path not in wanted]
    return sorted(set(stray) | set(pending_uploads(stack, run_id)))


# -- torch.load, watched ----------------------------------------------------------------------


@contextlib.contextmanager
def watching_torch_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every unpickling of a checkpoint (``torch.load`` and the zero-copy path's ``_load``)."""
    calls: list[str] = []
    with monkeypatch.context() as patch:
        for owner, name in ((torch, "load"), (torch.serialization, "_load")):
            original = getattr(owner, name)

            def spy(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                calls.append(_name)
                return _original(*args, **kwargs)

            patch.setattr(owner, name, spy)
        yield calls
