"""Parsing the strings users hand over: run sources and S3 locations (no torch, no network)."""

from __future__ import annotations

import pytest

from tracking import layout
from tracking.uri import RunSource, parse_s3_uri, parse_source

RUN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("source", "parsed"),
    [
        (RUN, RunSource(run_id=RUN)),
        (f"runs:/{RUN}", RunSource(run_id=RUN)),
        (f"runs:/{RUN}/checkpoints", RunSource(run_id=RUN, artifact_path="checkpoints")),
        ("models:/seed@champion", RunSource(model_name="seed", alias="champion")),
        ("models:/seed/3", RunSource(model_name="seed", version="3")),
    ],
)
def test_sources_parse_into_their_parts(source: str, parsed: RunSource) -> None:
    assert parse_source(source) == parsed


@pytest.mark.parametrize("source", ["", "runs:/", "models:/seed", "models:/seed/latest", "s3://b/k", 7])
def test_malformed_sources_are_value_errors(source: object) -> None:
    with pytest.raises(ValueError):
        parse_source(source)  # type: ignore[arg-type]


def test_s3_uri_splits_into_bucket_and_key_and_joins() -> None:
    location = parse_s3_uri("s3://bucket/a/b/")
    assert (location.bucket, location.key) == ("bucket", "a/b/")
    assert str(location.join("c", "d.pt")) == "s3://bucket/a/b/c/d.pt"
    with pytest.raises(ValueError):
        parse_s3_uri("file:///tmp")


@pytest.mark.parametrize(
    ("path", "epoch"),
    [
        ("checkpoints/epoch_0003", 3),
        ("checkpoints/epoch_0003/", 3),
        ("checkpoints/epoch_12345/checkpoint.pt", 12345),
        ("checkpoints/epoch_0003/manifest.json", 3),
        ("checkpoints/epoch_\u00b9", None),
        ("checkpoints/epoch_0003/other.pt", None),
        ("state_dict", None),
        ("model", None),
    ],
)
def test_a_checkpoint_path_names_its_epoch_and_nothing_else_does(path: str, epoch: int | None) -> None:
    assert layout.epoch_of(path) == epoch
