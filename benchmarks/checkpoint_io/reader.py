"""The reader's figure: tracking's S3 read of one object against one streamed get_object, server by server.

On each server (moto's, as ``moto.server.ThreadedMotoServer`` in this process, the way
moto-backed test suites run it; and SeaweedFS, the bench stack's), one object of the given
size is read, in alternating order, by ``S3Store.read`` (checked against its size and sha256,
fanning out into ranged GETs where the server makes them pay) and by one streamed
``get_object`` read into a buffer of its own (the baseline, measured in the same run). The
figure is the ratio of their medians, to hold at <= :data:`READER_BOUND` on every server.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tracking.config import TrackingConfig
from tracking.manifest import StoredFile
from tracking.storage.ranged import ReadRecord
from tracking.storage.s3 import S3Store

READER_BOUND = 1.3
_BLOCK = 8 * 2**20
_MOTO_BUCKET = "bench-reader"


@contextmanager
def moto_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free port of 127.0.0.1, with a bucket; its endpoint and credentials."""
    import boto3
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request of moto's server on stderr: the figures are the output here.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "bucket": _MOTO_BUCKET,
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=_MOTO_BUCKET)
    try:
        yield env
    finally:
        server.stop()


def streamed_get(client: Any, bucket: str, key: str, size: int) -> mmap.mmap:
    """The baseline: one get_object, its body read in order into a buffer allocated as ours is."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        n = body.readinto(view[filled : filled + _BLOCK])
        if not n:
            raise RuntimeError(f"streamed GET {key}: ended after {filled} of {size} bytes")
        filled += n
    body.close()
    view.release()
    return buffer


def measure_reader(
    server: str,
    env: dict[str, str],
    bucket: str,
    prefix: str,
    size: int,
    rounds: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Medians of ours and of the baseline reading one ``size``-byte object on one server, and their ratio."""
    import boto3

    config = TrackingConfig.from_env(
        s3_endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
    )
    client = boto3.client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
        region_name=config.aws_region,
    )
    data = os.urandom(size)
    key = f"{prefix}/reader/object.bin"
    client.put_object(Bucket=bucket, Key=key, Body=data)
    expected = StoredFile(size, hashlib.sha256(data).hexdigest())
    del data
    store = S3Store(f"s3://{bucket}/{prefix}", config, owner=f"bench reader ({server})")
    samples: dict[str, list[float]] = {"ours": [], "get_object": []}
    records: list[ReadRecord] = []
    try:
        for round_ in range(rounds + 1):  # the first round warms connections up and is not counted
            order = ("ours", "get_object") if round_ % 2 else ("get_object", "ours")
            for contender in order:
                start = time.perf_counter()
                if contender == "ours":
                    got: Any = store.read("reader/object.bin", expected)
                    records.append(store.last_read)
                else:
                    got = streamed_get(client, bucket, key, size)
                took = time.perf_counter() - start
                del got
                if round_:
                    samples[contender].append(took)
    finally:
        client.delete_object(Bucket=bucket, Key=key)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratio = medians["ours"] / medians["get_object"]
    first = statistics.median(r.answered_in for r in records)
    part = statistics.median(r.first_part_s for r in records)
    log(
        f"reader on {server}, {size / 2**20:.0f} MiB: ours {medians['ours']:.3f} s, one get_object "
        f"{medians['get_object']:.3f} s: {ratio:.2f}x (first answer {first * 1000:.1f} ms, first part "
        f"{part * 1000:.1f} ms, ranged GET threads {sorted({r.fanned_out for r in records})})"
    )
    return {
        "server": server,
        "bytes": size,
        "medians_s": medians,
        "samples_s": samples,
        "reads": [r._asdict() for r in records],
        "ratio": ratio,
        "bound": READER_BOUND,
        "pass": ratio <= READER_BOUND,
    }
