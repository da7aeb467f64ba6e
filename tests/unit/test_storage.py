"""The S3 fast path's own moves: uploads that borrow tensor memory, reads into one verified buffer."""

from __future__ import annotations

import hashlib
import io
import random
import threading
from typing import Any

import pytest
import torch

import tracking
from tests.unit.conftest import BUCKET
from tracking.config import TrackingConfig
from tracking.manifest import StoredFile
from tracking.payload import TorchSave
from tracking.storage import multipart
from tracking.storage.s3 import S3Store
from tracking.uri import S3Location

# The smallest part S3 allows, so that a few MB already go multipart.
PART_MB = 5


def s3_store() -> S3Store:
    return S3Store(f"s3://{BUCKET}/direct", TrackingConfig.from_env(part_size_mb=PART_MB), owner=f"run {'0' * 32}")


def payload() -> dict[str, Any]:
    torch.manual_seed(0)
    # Large tensors (borrowed) between many small ones and zip headers (copied): 3 parts and a bit.
    return {
        "big": [torch.randn(1024, 1024) for _ in range(4)],
        "small": {f"t{i}": torch.randn(7) for i in range(50)},
        "epoch": 3,
    }


def serialized(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture
def segments(monkeypatch: pytest.MonkeyPatch) -> list[memoryview]:
    """Every part body's segments, as handed to the upload."""
    seen: list[memoryview] = []
    real_init = multipart._SegmentReader.__init__

    def spy(self: multipart._SegmentReader, parts: list[memoryview]) -> None:
        seen.extend(parts)
        real_init(self, parts)

    monkeypatch.setattr(multipart._SegmentReader, "__init__", spy)
    return seen


def test_multipart_upload_borrows_tensor_memory_and_stores_the_same_bytes(
    mocked_s3: Any, segments: list[memoryview]
) -> None:
    value = payload()
    expected = serialized(value)

    stored = s3_store().write("a/checkpoint.pt", TorchSave(value))

    body = mocked_s3.get_object(Bucket=BUCKET, Key="direct/a/checkpoint.pt")["Body"].read()
    assert body == expected
    assert stored == StoredFile(len(expected), hashlib.sha256(expected).hexdigest())
    copied = sum(len(s) for s in segments if isinstance(s.obj, bytearray))
    assert sum(len(s) for s in segments) == len(expected)
    assert copied < 64 * 1024  # headers and the small tensors only: the 16 MB of weights went uncopied
    assert len(mocked_s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])) == 0


def test_a_producer_without_stable_memory_is_copied(mocked_s3: Any, segments: list[memoryview]) -> None:
    value = payload()
    expected = serialized(value)

    s3_store().write("b/checkpoint.pt", lambda stream: torch.save(value, stream))

    assert mocked_s3.get_object(Bucket=BUCKET, Key="direct/b/checkpoint.pt")["Body"].read() == expected
    assert all(isinstance(s.obj, bytearray) for s in segments)


def test_read_returns_verified_bytes_and_refuses_a_longer_object(mocked_s3: Any) -> None:
    value = payload()
    s3 = s3_store()
    stored = s3.write("c/checkpoint.pt", TorchSave(value))

    data = s3.read("c/checkpoint.pt", stored)
    assert bytes(data) == serialized(value)
    assert bytes(s3.read("c/checkpoint.pt")) == serialized(value)  # no manifest: sized by the response

    # Same bytes in front, more behind: the hash of the first `size` bytes would still match.
    mocked_s3.put_object(Bucket=BUCKET, Key="direct/c/checkpoint.pt", Body=serialized(value) + b"tail")
    with pytest.raises(tracking.IntegrityError, match=r"is \d+ bytes, but its manifest says"):
        s3.read("c/checkpoint.pt", stored)


def test_segment_reader_reads_and_seeks_across_segments() -> None:
    rng = random.Random(0)
    pieces = [bytes(rng.randrange(256) for _ in range(n)) for n in (0, 5, 1, 17, 0, 9)]
    whole = b"".join(pieces)
    reader = multipart._SegmentReader([memoryview(p) for p in pieces])

    assert reader.read() == whole
    for _ in range(100):
        start, size = rng.randrange(len(whole) + 3), rng.randrange(1, 12)
        assert reader.seek(start) == start
        assert reader.read(size) == whole[start : start + size]
        assert reader.tell() == min(start + size, max(start, len(whole)))
    assert reader.seek(-4, io.SEEK_END) == len(whole) - 4
    assert reader.read() == whole[-4:]


@pytest.mark.parametrize("claimed", [10**13, 10**15])
def test_a_manifest_claiming_a_huge_size_fails_in_one_request_and_bounded_memory(
    s3_experiment: str, claimed: int
) -> None:
    """The object's real size (the first GET's answer) is checked before any buffer or range plan:
    time and memory must not scale with what the manifest claims (10**15 bytes took 9.2 GB)."""
    import tracemalloc

    import mlflow
    from click.testing import CliRunner

    from pipelines.models import Model
    from tests.unit.test_hostile_inputs import checkpoint_of
    from tests.unit.test_loader import tamper_manifest
    from tracking.cli import main

    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    run_id = run.info.run_id
    tamper_manifest(run_id, 1, lambda m: m["files"]["checkpoint.pt"].update(size=claimed))
    path = f"checkpoint-epoch-0001 ({checkpoint_of(run_id, 1)})/checkpoint.pt"
    tracemalloc.start()
    try:
        with pytest.raises(tracking.IntegrityError, match=rf"is \d+ bytes, but its manifest says {claimed}"):
            tracking.load(run_id)
        result = CliRunner().invoke(main, ["verify", run_id])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # 10**13 planned 596,047 ranges: ~70 MiB
    assert result.exit_code == 1 and f"BAD {path}" in result.output, result.output
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize("fan_out", [True, False], ids=["ranges", "stream"])
def test_a_multipart_read_lands_whole_whether_or_not_ranges_pay(
    mocked_s3: Any, monkeypatch: pytest.MonkeyPatch, fan_out: bool
) -> None:
    """Both ways of reading: the stream joined by ranged GETs from the far end, and the stream alone
    (what a server slow to answer ranges, like moto's, gets)."""
    from tracking.storage import ranged

    monkeypatch.setattr(ranged, "RANGES_PAY", float("inf") if fan_out else 0.0)
    data = random.Random(7).randbytes(7 * PART_MB * 2**20 + 12345)  # 8 parts, the last one short
    mocked_s3.put_object(Bucket=BUCKET, Key="direct/d/big.bin", Body=data)
    s3 = s3_store()
    landed: list[int] = []
    got = s3.read("d/big.bin", StoredFile(len(data), hashlib.sha256(data).hexdigest()), landed.append)
    assert bytes(got) == data
    assert sum(landed) == len(data) and len(landed) == 8
    assert (s3.last_read.fanned_out > 0) == fan_out
    # Same length, other bytes: caught by the hash however the parts arrived.
    with pytest.raises(tracking.IntegrityError, match="does not match its manifest"):
        s3.read("d/big.bin", StoredFile(len(data), hashlib.sha256(b"other").hexdigest()))


def test_a_new_client_reads_no_botocore_data_file_again(mocked_s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients are made again for every change of credentials or endpoint (each test of a suite, in
    tracking.testing): botocore's JSON service models are parsed once a process, not once a client."""
    import boto3
    import botocore.loaders

    from tracking.storage.s3_client import _data_loader, s3_client

    s3_client(TrackingConfig.from_env())  # loads what a first client needs
    loaded: list[str] = []
    real_load = botocore.loaders.JSONFileLoader.load_file

    def spy(self: botocore.loaders.JSONFileLoader, file_path: str) -> Any:
        loaded.append(file_path)
        return real_load(self, file_path)

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", spy)
    s3_client.cache_clear()
    search_path = list(_data_loader(None).search_paths)
    s3_client(TrackingConfig.from_env()).list_objects_v2(Bucket=BUCKET)
    boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket=BUCKET)  # the user's, in tracking.testing
    assert loaded == []
    assert _data_loader(None).search_paths == search_path  # each boto3 session adds nothing more to it


class _PartLimitedS3:
    """What an S3 client of multipart uploads does, in memory: parts numbered 1 to 10,000 only, as S3 takes them."""

    def __init__(self) -> None:
        self.parts: dict[int, bytes] = {}
        self.stored = b""

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        return {"UploadId": "upload"}

    def upload_part(self, *, PartNumber: int, Body: Any, **kwargs: Any) -> dict[str, Any]:
        if not 1 <= PartNumber <= 10_000:
            raise RuntimeError(f"InvalidArgument: Part number must be an integer between 1 and 10000, got {PartNumber}")
        self.parts[PartNumber] = Body.read()
        return {"ETag": f"etag-{PartNumber}"}

    def complete_multipart_upload(self, *, MultipartUpload: dict[str, Any], **kwargs: Any) -> None:
        self.stored = b"".join(self.parts[p["PartNumber"]] for p in MultipartUpload["Parts"])

    def abort_multipart_upload(self, **kwargs: Any) -> None:
        pass


def test_a_file_of_more_parts_than_s3_takes_grows_its_parts_and_is_stored_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3 takes 10,000 parts per upload: a checkpoint over 10,000 x TRACKING_S3_PART_SIZE_MB (156 GiB at 16 MB)
    failed at its 10,001st part, after everything before it was uploaded. Parts of 1 KiB stand in for 16 MB."""
    monkeypatch.setattr(TrackingConfig, "part_size", property(lambda self: 1024))
    client = _PartLimitedS3()
    data = random.Random(0).randbytes(12_000 * 1024)
    upload = multipart.MultipartUpload(
        client, multipart.DaemonPool(4, "test-part"), S3Location(BUCKET, "big/checkpoint.pt"), TrackingConfig()
    )
    with upload:
        view = memoryview(data)
        for start in range(0, len(data), 300 * 1024):
            upload.feed(view[start : start + 300 * 1024])
        upload.finish()

    assert client.stored == data
    assert max(client.parts) <= 10_000
    sizes = [len(client.parts[n]) for n in sorted(client.parts)]
    assert sizes[0] == 1024 and sizes[:1000] == [1024] * 1000  # a file of under 1,000 parts keeps the size set


def test_a_part_pool_dropped_for_a_newer_concurrency_leaves_no_thread_and_still_serves_its_upload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shared part pools, one per worker count, were kept 4 at most: a process trying a fifth
    TRACKING_S3_MAX_CONCURRENCY dropped the oldest pool and left its threads waiting on its queue forever."""
    from tracking.storage import s3

    monkeypatch.setattr(s3, "_pools", {}, raising=False)  # this test's pools only
    before = set(threading.enumerate())
    oldest = s3._executor(3)
    assert oldest.submit(lambda: 1).result(timeout=5) == 1
    oldest_threads = set(threading.enumerate()) - before
    assert len(oldest_threads) == 3
    newer = [s3._executor(workers) for workers in (4, 5, 6, 7)]  # the fifth drops the oldest

    for thread in oldest_threads:
        thread.join(timeout=2)
    assert not [t.name for t in oldest_threads if t.is_alive()]
    # An upload that held the dropped pool goes on: its parts are uploaded, by workers that end after them.
    before = set(threading.enumerate())
    assert [f.result(timeout=5) for f in [oldest.submit(lambda n=n: n) for n in range(5)]] == list(range(5))
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=2)
        assert not thread.is_alive(), thread.name
    for pool in newer:
        assert pool.submit(lambda: 2).result(timeout=5) == 2
        pool.retire()  # this test's pools leave no thread behind either


def test_a_retired_part_pool_serves_an_upload_with_no_more_threads_than_its_size() -> None:
    """A retired pool started a thread for every part submitted to it: an upload that still held it, of a file of
    thousands of parts, started thousands of threads, as many at once as the parts queued."""
    pool = multipart.DaemonPool(3, "test-retired-part")
    assert pool.submit(lambda: 0).result(timeout=5) == 0
    pool.retire()
    for thread in [t for t in threading.enumerate() if t.name.startswith("test-retired-part")]:
        thread.join(timeout=2)  # idle once retired: ended
    release = threading.Event()
    started = set(threading.enumerate())
    futures = [pool.submit(lambda n=n: release.wait(5) and n) for n in range(40)]
    workers = {t for t in set(threading.enumerate()) - started if t.name.startswith("test-retired-part")}
    release.set()

    assert [f.result(timeout=5) for f in futures] == list(range(40))
    assert 1 <= len(workers) <= 3
    for thread in workers | {t for t in threading.enumerate() if t.name.startswith("test-retired-part")}:
        thread.join(timeout=2)
        assert not thread.is_alive(), thread.name


def test_a_server_that_ignores_ranges_still_reads_right(mocked_s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP lets a server (or a proxy in front of it) answer a ranged GET with the whole object (200, no
    Content-Range). Each range then held the object's first bytes, and a sound checkpoint failed its hash as
    "corrupted or replaced"."""
    from tracking.storage import ranged

    monkeypatch.setattr(ranged, "RANGES_PAY", float("inf"))
    data = random.Random(8).randbytes(4 * PART_MB * 2**20 + 999)
    mocked_s3.put_object(Bucket=BUCKET, Key="direct/r/big.bin", Body=data)
    s3 = s3_store()
    real_get = s3.client.get_object
    ignored: list[str] = []

    def ignoring_ranges(**kwargs: Any) -> Any:
        if "Range" in kwargs:
            ignored.append(kwargs.pop("Range"))
        return real_get(**kwargs)

    monkeypatch.setattr(s3.client, "get_object", ignoring_ranges)
    got = s3.read("r/big.bin", StoredFile(len(data), hashlib.sha256(data).hexdigest()))
    assert bytes(got) == data
    assert ignored and s3.last_read.fanned_out > 0


def test_a_huge_object_in_a_manifests_place_is_refused_before_it_is_read(
    mocked_s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest may have 64 MiB (manifest.MAX_BYTES); a larger object where one belongs (a checkpoint uploaded
    under its name) was read whole into memory first, whatever its size, and only then refused."""
    from tracking import layout, manifest

    monkeypatch.setattr(manifest, "MAX_BYTES", 1000)  # stands in for 64 MiB
    mocked_s3.put_object(Bucket=BUCKET, Key="direct/h/manifest.json", Body=b"{" + b" " * 2 * 2**20 + b"}")
    s3 = s3_store()
    real_get = s3.client.get_object
    bodies: list[Any] = []

    def counting(**kwargs: Any) -> Any:
        response = real_get(**kwargs)
        bodies.append(response["Body"])
        return response

    monkeypatch.setattr(s3.client, "get_object", counting)
    with pytest.raises(tracking.IntegrityError, match=r"h/manifest.json .*2097154 bytes.*more than the 1000"):
        layout.read_manifest(s3, "h")
    assert len(bodies) == 1 and bodies[0]._amount_read == 0


@pytest.mark.parametrize(
    ("message", "missing"),
    [
        # A server failure on a model whose ID holds the digits 404 (about one ID in 140 does): was "no such artifact",
        # so a sound checkpoint was passed over as one without a manifest.
        ("500 Server Error for url: .../m-26fa6a54585b41429a977cd404fdadb4/artifacts/manifest.json", False),
        ("failed to download mlflow-artifacts:/404/m-1/artifacts/manifest.json: 503 Service Unavailable", False),
        ("{'manifest.json': \"HTTPError('404 Client Error: NOT FOUND for url: http://...')\"}", True),
        ("An error occurred (404) when calling the HeadObject operation: Not Found", True),
    ],
)
def test_only_an_http_404_on_the_mlflow_path_is_a_missing_artifact(tmp_path: Any, message: str, missing: bool) -> None:
    from mlflow.exceptions import MlflowException

    from tracking.storage.artifact_repo import MlflowStore

    store = MlflowStore(tmp_path.as_uri(), owner="run r1")
    expected = tracking.NotFoundError if missing else tracking.StorageError
    with pytest.raises(expected), store._errors("manifest.json"):
        raise MlflowException(message)


def test_a_missing_file_on_the_mlflow_path_is_found_missing_without_downloading_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    from tracking.storage.artifact_repo import MlflowStore

    (tmp_path / "state_dict").mkdir()
    (tmp_path / "state_dict" / "state_dict.pt").write_bytes(b"weights")
    store = MlflowStore(tmp_path.as_uri(), owner="run r1")
    download = store.repo._download_file
    downloaded: list[str] = []

    def as_the_proxy_answers(remote_file_path: str, local_path: str) -> None:
        # MLflow 3.18's proxy answers a missing file with 500s, which its client retries, then reports so.
        downloaded.append(remote_file_path)
        if not (tmp_path / remote_file_path).is_file():
            raise MlflowException(
                f"{remote_file_path}: Max retries exceeded (Caused by ResponseError('too many 500 error responses'))"
            )
        download(remote_file_path, local_path)

    monkeypatch.setattr(store.repo, "_download_file", as_the_proxy_answers)
    # Was: a StorageError ("the artifact store failed ...; retry") for a manifest not written yet.
    with pytest.raises(tracking.NotFoundError, match=r"run r1: .*state_dict/manifest.json: no such artifact"):
        store.read("state_dict/manifest.json")
    with pytest.raises(tracking.NotFoundError):
        store.read("nowhere/manifest.json")
    assert downloaded == []
    assert bytes(store.read("state_dict/state_dict.pt")) == b"weights"
    assert downloaded == ["state_dict/state_dict.pt"]
