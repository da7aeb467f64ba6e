"""What must hold of a run after any fault, crash or corruption: the assertions this tier shares.

They read the run as a user would (``tracking.load``, ``tracking.audit.verify``) and the
bucket as an operator would (boto3 straight to the stack), with clients pointed straight at
the stack, never through a fault proxy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tests.reliability import workload
from tracking import layout
from tracking.catalog import LoggedCheckpoint
from tracking.errors import NotFoundError
from tracking.localstack import LocalStack

# epoch -> the model states some save of that epoch wrote (a re-log adds a second one)
Expected = Mapping[int, Sequence[Mapping[str, torch.Tensor]]]


def run_tags(run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.tags)


def checkpoints(run_id: str) -> dict[int, LoggedCheckpoint]:
    """The run's committed checkpoints by epoch, as a reader lists them (READY logged model and manifest)."""
    import tracking

    found = {}
    for checkpoint in tracking.list_checkpoints(run_id):
        assert checkpoint.epoch is not None and checkpoint.model_id is not None, checkpoint
        assert checkpoint.epoch not in found, f"two committed checkpoints of epoch {checkpoint.epoch}"
        found[checkpoint.epoch] = checkpoint
    return found


def committed(run_id: str) -> list[int]:
    """The epochs of the run's committed checkpoints, in order."""
    return sorted(checkpoints(run_id))


def model_epoch(model_id: str) -> int | None:
    """The epoch of a checkpoint's logged model (whatever its status); None when there is no such model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        model = MlflowClient().get_logged_model(model_id)
    except MlflowException:
        return None
    raw = (model.params or {}).get(layout.PARAM_EPOCH, "")
    named = layout.key_of(model.name)
    return int(raw) if raw.isdecimal() else (named[1] if named else None)


def epoch_of_tag(tags: Mapping[str, str], tag: str) -> int | None:
    """The epoch of the checkpoint a pointer tag (a logged model ID) names; None when it names none."""
    value = tags.get(tag)
    return None if value is None else model_epoch(value)


def _check_loaded(loaded: Any, checkpoint: LoggedCheckpoint, expected: Expected | None, how: str) -> None:
    epoch = checkpoint.epoch
    assert loaded.epoch == epoch, f"{how}: loaded epoch {loaded.epoch}, expected {epoch}"
    assert loaded.model_id == checkpoint.model_id, (
        f"{how}: loaded logged model {loaded.model_id}, the committed checkpoint of epoch {epoch} is "
        f"{checkpoint.model_id}"
    )
    if expected is None:  # weights not known here (a pipeline's): the manifest's sha256 vouches for them
        return
    assert epoch is not None
    candidates = expected.get(epoch, ())
    state = loaded.model.state_dict()
    assert any(workload.same_state(state, candidate) for candidate in candidates), (
        f"{how}: the weights loaded for epoch {epoch} are not what any save of epoch {epoch} wrote (torn checkpoint)"
    )


def _pointed(tags: Mapping[str, str], tag: str, found: Mapping[int, LoggedCheckpoint]) -> LoggedCheckpoint:
    by_id = {checkpoint.model_id: checkpoint for checkpoint in found.values()}
    named = by_id.get(tags[tag])
    assert named is not None, (
        f"{tag}={tags[tag]!r} (epoch {epoch_of_tag(tags, tag)}) names no committed checkpoint: "
        f"{ {e: c.model_id for e, c in found.items()} }"
    )
    return named


def assert_sound(run_id: str, expected: Expected | None) -> list[int]:
    """Every committed checkpoint loads (exactly as saved, when ``expected`` says what that was), the
    pointers name committed checkpoints, and verify finds every committed file intact.

    Returns the committed epochs.
    """
    import tracking
    from tracking.audit import verify
    from tracking.selection import find_checkpoint

    found = checkpoints(run_id)
    epochs = sorted(found)
    tags = run_tags(run_id)
    latest = best = None
    if epochs or layout.TAG_LATEST in tags:
        assert layout.TAG_LATEST in tags, f"the run has committed checkpoints {epochs} but no latest tag"
        latest = _pointed(tags, layout.TAG_LATEST, found)
        assert tags.get(layout.TAG_LATEST_EPOCH) == str(latest.epoch), (
            f"{layout.TAG_LATEST_EPOCH}={tags.get(layout.TAG_LATEST_EPOCH)!r}, its model {latest.model_id} "
            f"is epoch {latest.epoch}"
        )
        _check_loaded(tracking.load(run_id), latest, expected, "load(run) [latest]")
    if layout.TAG_BEST in tags:
        best = _pointed(tags, layout.TAG_BEST, found)
        if (
            latest is not None and best.model_id == latest.model_id
        ):  # loaded above already: only check that "best" resolves to it
            located = find_checkpoint(run_id, "best")
            assert located.model_id == best.model_id, f"'best' resolves to {located.label}, its tag names {best.uri}"
            manifest = located.manifest
        else:
            loaded_best = tracking.load(run_id, "best")
            _check_loaded(loaded_best, best, expected, "load(run, 'best')")
            manifest = loaded_best.manifest
        recorded = float(tags[layout.TAG_BEST_VALUE])
        monitor = tags[layout.TAG_MONITOR]
        assert manifest.metrics[monitor] == recorded, (
            f"best tag says {monitor}={recorded}, its checkpoint {best.epoch} has {manifest.metrics[monitor]}"
        )
    pointed = {c.model_id for c in (latest, best) if c is not None}
    for epoch, checkpoint in found.items():
        if checkpoint.model_id not in pointed:
            _check_loaded(tracking.load(run_id, epoch), checkpoint, expected, f"load(run, {epoch})")
    report = verify(run_id)
    bad = {path: problem for path, problem in report.items() if problem is not None}
    assert not bad, f"verify found faults in committed files: {bad}"
    for checkpoint in found.values():
        folder = part_label(checkpoint.path, str(checkpoint.model_id)) + "/"
        assert any(path.startswith(folder) for path in report), f"verify did not check committed {folder}: {report}"
    return epochs


def part_label(name: str, model_id: str) -> str:
    """How verify names a checkpoint's logged model: ``checkpoint-epoch-0002 (m-...)``."""
    return f"{name} ({model_id})"


# -- the bucket, seen by an operator ------------------------------------------------------------


def _split(uri: str) -> tuple[str, str]:
    assert uri.startswith("s3://"), uri
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.rstrip("/") + "/"


def artifact_prefix(run_id: str) -> tuple[str, str]:
    """The bucket and key prefix (ending in /) of a run's artifact root."""
    from mlflow import MlflowClient

    return _split(MlflowClient().get_run(run_id).info.artifact_uri)


def experiment_prefix(run_id: str) -> tuple[str, str]:
    """The bucket and key prefix (ending in /) of the artifact root of the run's experiment."""
    from mlflow import MlflowClient

    client = MlflowClient()
    return _split(client.get_experiment(client.get_run(run_id).info.experiment_id).artifact_location)


def model_prefix(run_id: str, model_id: str) -> tuple[str, str]:
    """The bucket and key prefix (ending in /) of a logged model's files: ``models/<id>/artifacts/``."""
    bucket, root = experiment_prefix(run_id)
    return bucket, f"{root}{MODELS}{model_id}/{ARTIFACTS}"


MODELS = "models/"
ARTIFACTS = "artifacts/"


@dataclass(frozen=True)
class Model:
    """A logged model whose files are under the experiment's ``models/<model_id>/artifacts/``."""

    model_id: str
    name: str | None  # None: deleted, or unknown to the tracking server
    status: str | None = None

    @property
    def label(self) -> str:
        return part_label(self.name, self.model_id) if self.name else f"{MODELS}{self.model_id}/{ARTIFACTS}".rstrip("/")


def _objects(stack: LocalStack, bucket: str, prefix: str) -> list[str]:
    pages = stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", []))


def _uploads(stack: LocalStack, bucket: str, prefix: str) -> list[str]:
    listed = stack.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return sorted(upload["Key"][len(prefix) :] for upload in listed.get("Uploads", []))


def run_models(run_id: str) -> list[Model]:
    """The run's checkpoint logged models, whatever their status (deleted ones vanish from search)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    terms = f"source_run_id = '{run_id}' AND model_type = '{layout.CHECKPOINT_MODEL_TYPE}'"
    found, token = [], None
    for _ in range(1000):
        page = client.search_logged_models([experiment_id], filter_string=terms, max_results=100, page_token=token)
        found += [Model(m.model_id, m.name, str(m.status)) for m in page]
        token = page.token
        if not token:
            break
    return found


def _owners(stack: LocalStack, run_id: str, listing: Any) -> dict[str, Model]:
    """Who owns each model folder under the experiment's ``models/``: the run's checkpoint models, and
    models that are deleted or unknown (whoever's they were); other live models are not the run's."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    bucket, root = experiment_prefix(run_id)
    owners = {model.model_id: model for model in run_models(run_id)}
    client = MlflowClient()
    folders = {path.split("/", 1)[0] for path in listing(stack, bucket, root + MODELS)}
    for model_id in sorted(folders - set(owners)):
        try:
            client.get_logged_model(model_id)
        except MlflowException:
            owners[model_id] = Model(model_id, None)
    return owners


def stored(stack: LocalStack, run_id: str) -> list[str]:
    """Every object of the run: below its artifact root (``state_dict/...``), and the files of its checkpoint
    logged models and of deleted or unknown ones (``<label>/<file>``, the label as verify names it)."""
    return _listed(stack, run_id, _objects)


def pending_uploads(stack: LocalStack, run_id: str) -> list[str]:
    """Multipart uploads begun below the run's artifact root or in one of its (or a deleted) logged model's
    location, and never completed or aborted; named as :func:`stored` names objects."""
    return _listed(stack, run_id, _uploads)


def _listed(stack: LocalStack, run_id: str, listing: Any) -> list[str]:
    bucket, run_root = artifact_prefix(run_id)
    found = list(listing(stack, bucket, run_root))
    for model_id, model in _owners(stack, run_id, listing).items():
        _, prefix = model_prefix(run_id, model_id)
        found += [f"{model.label}/{path}" for path in listing(stack, bucket, prefix)]
    return sorted(found)


def leftovers(stack: LocalStack, run_id: str) -> list[str]:
    """What saves that never committed left: the run's checkpoint logged models that are not committed
    (``<label>``), objects no committed manifest lists (``state_dict/<file>``, ``<label>/<file>``), objects of
    deleted or unknown logged models, and multipart uploads never completed or aborted."""
    from tracking.run import open_run

    found = checkpoints(run_id)
    wanted: set[str] = set()
    for checkpoint in found.values():
        label = part_label(checkpoint.path, str(checkpoint.model_id))
        wanted.add(f"{label}/{layout.MANIFEST_FILE}")
        wanted.update(f"{label}/{name}" for name in checkpoint.manifest.files)
    store = open_run(run_id).store
    if store.list_files(layout.STATE_DICT_DIR):
        wanted.add(layout.manifest_path(layout.STATE_DICT_DIR))
        try:
            manifest = layout.read_manifest(store, layout.STATE_DICT_DIR)
            wanted.update(f"{layout.STATE_DICT_DIR}/{name}" for name in manifest.files)
        except NotFoundError:
            pass
    # The run's own state_dict/ (and checkpoints/ of the old layout), and every logged model's files.
    ours = (f"{layout.STATE_DICT_DIR}/", f"{layout.LEGACY_CHECKPOINTS_DIR}/", MODELS, "checkpoint-epoch-")
    stray = [path for path in stored(stack, run_id) if path.startswith(ours) and path not in wanted]
    committed_ids = {checkpoint.model_id for checkpoint in found.values()}
    models = [model.label for model in run_models(run_id) if model.model_id not in committed_ids]
    return sorted(set(stray) | set(models) | set(pending_uploads(stack, run_id)))


def covered(leftover: str, reported: set[str]) -> bool:
    """Whether verify's leftovers name ``leftover``: itself, or the whole logged model it belongs to."""
    return leftover in reported or leftover.split("/", 1)[0] in reported


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
