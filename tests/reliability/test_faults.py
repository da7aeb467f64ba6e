"""Promises: "No torn checkpoint is ever loaded: faults ... at any phase of a save leave the previous
checkpoint loadable and the pointers right" and "transport failures are StorageError ("retry"),
not corruption".

A fault proxy in front of the real SeaweedFS and MLflow server fails one phase of a save
(creating the checkpoint's logged model, creating the multipart upload, a part, completing it,
the manifest, marking the logged model READY, moving the tags) or of a load (the run lookup,
the logged model lookup, the manifest GET, a ranged GET), once or for good, with S3's own error
answers, reset connections, cut bodies and lost answers. After each: the call succeeded (after
retries) or raised StorageError; a save that raised committed nothing and left latest on the
previous checkpoint; what the run holds loads exactly as saved; latest and best name committed
checkpoints; verify finds every committed file intact, reports what the fault left behind, and
clean_leftovers removes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tracking
from tests.reliability import invariants, workload
from tests.reliability.conftest import Route
from tests.reliability.proxy import FaultProxy
from tracking import layout
from tracking.audit import clean_leftovers, verify
from tracking.errors import StorageError

# A checkpoint's files are at the root of its logged model's location: .../models/m-<hex>/artifacts/.
# Faults are added after epoch 1 is saved, so these match only the faulted save's requests.
MODEL_FILES = r"/models/m-[0-9a-f]{32}/artifacts/"
DATA = rf"{MODEL_FILES}{re.escape(layout.CHECKPOINT_FILE)}"
MANIFEST = rf"{MODEL_FILES}{re.escape(layout.MANIFEST_FILE)}"
TAGS = r"^POST /api/2\.0/mlflow/runs/(log-batch|set-tag)\b"
CREATE_MODEL = r"^POST /api/2\.0/mlflow/logged-models(\?|$)"
FINALIZE_MODEL = r"^PATCH /api/2\.0/mlflow/logged-models/m-[0-9a-f]{32}(\?|$)"  # READY (and FAILED)
GET_MODEL = r"^GET /api/2\.0/mlflow/logged-models/m-[0-9a-f]{32}(\?|$)"
EVERY = None  # Rule(times=None): fault every match, not just the first

# phase -> (which server, request-line pattern)
SAVE_PHASES: dict[str, tuple[str, str]] = {
    "create-model": ("tracking", CREATE_MODEL),
    "create-upload": ("s3", rf"^POST \S*{DATA}\?uploads"),
    "upload-part-2": ("s3", rf"^PUT \S*{DATA}\?\S*\bpartNumber=2\b"),
    "complete-upload": ("s3", rf"^POST \S*{DATA}\?uploadId="),
    "write-manifest": ("s3", rf"^PUT \S*{MANIFEST}"),
    "mark-ready": ("tracking", FINALIZE_MODEL),
    "move-tags": ("tracking", TAGS),
}

# (phase, fault name, Rule arguments)
SAVE_FAULTS: list[tuple[str, str, dict[str, Any]]] = [
    ("create-model", "503-once", {"action": "status", "status": 503}),
    ("create-model", "answer-lost-once", {"action": "drop_response"}),
    ("create-model", "500-always", {"action": "status", "status": 500, "times": EVERY}),
    ("create-upload", "503-once", {"action": "status", "status": 503}),
    ("create-upload", "500-always", {"action": "status", "status": 500, "times": EVERY}),
    ("create-upload", "reset-always", {"action": "reset_request", "times": EVERY}),
    ("upload-part-2", "503-once", {"action": "status", "status": 503}),
    ("upload-part-2", "reset-mid-body-always", {"action": "reset_request", "after_bytes": 1 << 20, "times": EVERY}),
    ("upload-part-2", "503-always", {"action": "status", "status": 503, "times": EVERY}),
    ("complete-upload", "500-once", {"action": "status", "status": 500}),
    ("complete-upload", "answer-lost-once", {"action": "drop_response"}),
    ("complete-upload", "503-always", {"action": "status", "status": 503, "times": EVERY}),
    ("write-manifest", "503-once", {"action": "status", "status": 503}),
    ("write-manifest", "answer-lost-once", {"action": "drop_response"}),
    ("write-manifest", "reset-always", {"action": "reset_request", "times": EVERY}),
    ("mark-ready", "503-once", {"action": "status", "status": 503}),
    ("mark-ready", "answer-lost-once", {"action": "drop_response"}),
    ("mark-ready", "500-always", {"action": "status", "status": 500, "times": EVERY}),
    ("move-tags", "503-once", {"action": "status", "status": 503}),
    ("move-tags", "answer-lost-once", {"action": "drop_response"}),
    ("move-tags", "answer-lost-always", {"action": "drop_response", "times": EVERY}),
    ("move-tags", "500-always", {"action": "status", "status": 500, "times": EVERY}),
    ("move-tags", "reset-always", {"action": "reset_request", "times": EVERY}),
]


def _proxy(route: Route, server: str) -> FaultProxy:
    return route.s3 if server == "s3" else route.tracking


@pytest.fixture
def quick_mlflow_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's REST client retries 7 times with exponential backoff (minutes against a fault
    # that never clears); the promises here are about what is stored, not about how long.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


def _outcome(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return call(), None
    except Exception as exc:
        return None, exc


def _assert_storage_error(error: BaseException | None, what: str) -> None:
    if error is not None and not isinstance(error, StorageError):
        pytest.fail(
            f"{what} raised {type(error).__module__}.{type(error).__name__}, not StorageError: {error}", pytrace=False
        )


@pytest.mark.parametrize(("phase", "fault", "rule"), SAVE_FAULTS, ids=[f"{p}-{f}" for p, f, _ in SAVE_FAULTS])
def test_fault_during_save(
    phase: str,
    fault: str,
    rule: dict[str, Any],
    route: Route,
    new_run: Callable[[], str],
    small_parts: None,
    quick_mlflow_retries: None,
) -> None:
    server, pattern = SAVE_PHASES[phase]
    run_id = new_run()
    workload.log(run_id, 1, hidden=workload.SMALL)
    expected = {1: [workload.model_state(1, workload.SMALL)], 2: [workload.model_state(2)]}
    injected = _proxy(route, server).add(pattern, **rule)

    _, error = _outcome(lambda: workload.log(run_id, 2))

    assert injected.injected >= 1, f"the {phase} phase was never reached: {injected.pattern} matched no request"
    _assert_storage_error(error, f"log_checkpoint with {fault} at {phase}")
    route.direct()
    epochs = invariants.assert_sound(run_id, expected)
    assert 1 in epochs, "the previous checkpoint is gone"
    latest = invariants.epoch_of_tag(invariants.run_tags(run_id), layout.TAG_LATEST)
    if error is None:
        assert epochs == [1, 2] and latest == 2, f"the save succeeded, yet committed={epochs}, latest={latest}"
    else:
        # A save that raised did not commit, whichever phase failed: its logged model is not READY with
        # a manifest, and the tags still name epoch 1.
        assert epochs == [1], f"the save failed at {phase} ({error}), yet committed={epochs}"
        assert latest == 1, f"the save failed at {phase} ({error}), yet latest names epoch {latest}"
    # Whatever the fault left (a FAILED or orphaned logged model, stray files) is a leftover that
    # verify reports and clean removes.
    _assert_cleanable(run_id, route)


def _assert_cleanable(run_id: str, route: Route) -> None:
    left = invariants.leftovers(route.stack, run_id)
    reported = {leftover.path for leftover in verify(run_id).leftovers}
    assert all(invariants.covered(path, reported) for path in left), f"verify misses leftovers {left}: {reported}"
    clean_leftovers(run_id)
    assert invariants.leftovers(route.stack, run_id) == [], "clean_leftovers left leftovers behind"


# -- loads ------------------------------------------------------------------------------------

LOAD_PHASES: dict[str, tuple[str, str, int]] = {
    # phase -> (server, pattern, matches to let through first)
    "run-lookup": ("tracking", r"^GET /api/2\.0/mlflow/runs/get\b", 0),
    "model-lookup": ("tracking", GET_MODEL, 0),
    "manifest-get": ("s3", rf"^GET \S*{MANIFEST}", 0),
    # The data's GET: a read streams the whole object (ranged GETs join it only where they pay,
    # tests/unit/test_storage.py), so the first GET of the file carries the fault.
    "data-get": ("s3", rf"^GET \S*{DATA}", 0),
}

LOAD_FAULTS: list[tuple[str, str, dict[str, Any]]] = [
    ("run-lookup", "503-always", {"action": "status", "status": 503, "times": EVERY}),
    ("run-lookup", "reset-always", {"action": "reset_request", "times": EVERY}),
    ("model-lookup", "503-always", {"action": "status", "status": 503, "times": EVERY}),
    ("model-lookup", "reset-always", {"action": "reset_request", "times": EVERY}),
    ("manifest-get", "503-once", {"action": "status", "status": 503}),
    ("manifest-get", "503-always", {"action": "status", "status": 503, "times": EVERY}),
    ("manifest-get", "cut-body-always", {"action": "cut_response", "after_bytes": 10, "times": EVERY}),
    ("data-get", "503-once", {"action": "status", "status": 503}),
    ("data-get", "reset-mid-body-once", {"action": "reset_response", "after_bytes": 1 << 20}),
    ("data-get", "cut-body-once", {"action": "cut_response", "after_bytes": 1 << 20}),
    ("data-get", "answer-lost-always", {"action": "drop_response", "times": EVERY}),
]


@pytest.fixture(scope="module")
def committed_run(stack_postgres: Any) -> Iterator[str]:
    """A run with two committed multipart checkpoints (epochs 1 and 2), shared by the load tests (read only)."""
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow import MlflowClient

    from tracking.storage.s3_client import s3_client

    with pytest.MonkeyPatch.context() as patch:
        for key, value in stack_postgres.env().items():
            patch.setenv(key, value)
        patch.setenv("TRACKING_S3_PART_SIZE_MB", "5")
        patch.setattr(tracking_utils, "_tracking_uri", stack_postgres.tracking_uri)
        s3_client.cache_clear()
        client = MlflowClient(stack_postgres.tracking_uri)
        run_id = client.create_run(client.create_experiment("reliability-loads")).info.run_id
        workload.log(run_id, 1)
        workload.log(run_id, 2)
    yield str(run_id)


@pytest.mark.parametrize(("phase", "fault", "rule"), LOAD_FAULTS, ids=[f"{p}-{f}" for p, f, _ in LOAD_FAULTS])
def test_fault_during_load(
    phase: str,
    fault: str,
    rule: dict[str, Any],
    committed_run: str,
    route: Route,
    small_parts: None,
    quick_mlflow_retries: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, pattern, skip = LOAD_PHASES[phase]
    injected = _proxy(route, server).add(pattern, skip=skip, **rule)

    with invariants.watching_torch_load(monkeypatch) as unpickled:
        loaded, error = _outcome(lambda: tracking.load(committed_run))

    assert injected.injected >= 1, f"the {phase} phase was never reached: {injected.pattern} matched no request"
    _assert_storage_error(error, f"load with {fault} at {phase}")
    if error is None:
        assert loaded.epoch == 2 and workload.same_state(loaded.model.state_dict(), workload.model_state(2)), (
            "a load through a faulty connection returned other weights than were saved"
        )
    else:
        assert not unpickled, f"torch.load ran although the load failed ({error})"
    route.direct()
    assert tracking.load(committed_run).epoch == 2, "a failed load changed what the run holds"


# -- re-logging an epoch: "Re-logging must not destroy the old one before the new one is committed" --

RELOG_FAULTS: list[tuple[str, str, str, dict[str, Any]]] = [
    # (phase, server, pattern, Rule arguments): each fails the re-log for good
    ("upload-part-2", "s3", SAVE_PHASES["upload-part-2"][1], {}),
    ("write-manifest", "s3", SAVE_PHASES["write-manifest"][1], {}),
    ("mark-ready", "tracking", FINALIZE_MODEL, {"status": 500}),
    ("move-tags", "tracking", TAGS, {"status": 500}),
]


@pytest.mark.parametrize(("phase", "server", "pattern", "rule"), RELOG_FAULTS, ids=[f[0] for f in RELOG_FAULTS])
def test_fault_during_relog_keeps_the_old_checkpoint(
    phase: str,
    server: str,
    pattern: str,
    rule: dict[str, Any],
    route: Route,
    new_run: Callable[[], str],
    small_parts: None,
    quick_mlflow_retries: None,
) -> None:
    run_id = new_run()
    workload.log(run_id, 1)
    old, new = workload.model_state(1), workload.model_state(1, salt=1)
    injected = _proxy(route, server).add(pattern, "status", **{"status": 503, "times": EVERY, **rule})

    _, error = _outcome(lambda: workload.log(run_id, 1, salt=1))

    assert injected.injected >= 1, f"the {phase} phase was never reached: {injected.pattern} matched no request"
    assert error is not None, f"the re-log succeeded although every {phase} request failed"
    _assert_storage_error(error, f"re-log with {phase} failing")
    route.direct()
    # The re-log failed, so it never counted: epoch 1 loads exactly the old weights, by every route.
    epochs = invariants.assert_sound(run_id, {1: [old]})
    assert epochs == [1], f"the re-log failed at {phase} ({error}) and destroyed the old checkpoint of epoch 1"
    assert not workload.same_state(tracking.load(run_id, 1).model.state_dict(), new)
    _assert_cleanable(run_id, route)
    assert workload.same_state(tracking.load(run_id).model.state_dict(), old), "clean_leftovers changed epoch 1"
