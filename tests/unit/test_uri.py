"""Parsing the strings users hand over: run sources and S3 locations (no torch, no network)."""

from __future__ import annotations

import re

import pytest

from tracking import layout
from tracking.uri import RunSource, bucket_name_problem, parse_s3_uri, parse_source

RUN = "0123456789abcdef0123456789abcdef"
MODEL = "m-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("source", "parsed"),
    [
        (RUN, RunSource(run_id=RUN)),
        (f"runs:/{RUN}", RunSource(run_id=RUN)),
        (f"runs:/{RUN}/state_dict", RunSource(run_id=RUN, artifact_path="state_dict")),
        (f"models:/{MODEL}", RunSource(model_id=MODEL)),
        ("models:/seed@champion", RunSource(model_name="seed", alias="champion")),
        ("models:/seed/3", RunSource(model_name="seed", version="3")),
        ("models:/seed/latest", RunSource(model_name="seed", stage="latest")),
        ("models:/seed/Production", RunSource(model_name="seed", stage="Production")),
        ("models:/seed/\u00b3", RunSource(model_name="seed", stage="\u00b3")),  # a digit, but no version number
        ("models:/team@seed@champion", RunSource(model_name="team@seed", alias="champion")),
        ("models:/team@seed/2", RunSource(model_name="team@seed", version="2")),
        ("models:/my seed@champion", RunSource(model_name="my seed", alias="champion")),
    ],
)
def test_sources_parse_into_their_parts(source: str, parsed: RunSource) -> None:
    assert parse_source(source) == parsed


@pytest.mark.parametrize(
    "source", ["", "runs:/", "models:/seed", "models:/seed@", "models:/@c", "models:/a/b/3", "s3://b/k", 7]
)
def test_malformed_sources_are_value_errors(source: object) -> None:
    with pytest.raises(ValueError):
        parse_source(source)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "source",
    ["a b", "../x", "..", "-x", ".hidden", "run%20id", "runs:/a b", "runs:/../x", "runs:/-x/state_dict", "r" * 257],
)
def test_what_mlflow_refuses_as_a_run_id_is_a_value_error_saying_what_one_looks_like(source: str) -> None:
    # Was a run ID handed to the server: "not found", as if the run had been deleted.
    with pytest.raises(ValueError, match=re.escape("is not a run ID: a run ID is 32 hex characters, e.g. ")):
        parse_source(source)


@pytest.mark.parametrize(
    "run_id",
    [
        RUN,
        RUN.upper(),
        "not-a-run",  # MLflow's own rule takes it: a server may hold such a run
        "dreamy_lemon_5hy8k2ll1b",  # an Azure Machine Learning job name, its MLflow run ID
        "r" * 256,
    ],
)
def test_every_run_id_mlflow_takes_is_passed_on_to_the_server(run_id: str) -> None:
    assert parse_source(run_id) == RunSource(run_id=run_id)
    assert parse_source(f"runs:/{run_id}/state_dict") == RunSource(run_id=run_id, artifact_path="state_dict")


@pytest.mark.parametrize(
    ("source", "extra"),
    [
        ("models:/seed@champion/model", "model"),
        ("models:/seed@champion/model/data", "model/data"),
        ("models:/seed/3/model", "model"),
    ],
)
def test_a_models_uri_with_a_path_after_its_model_is_refused_naming_the_accepted_forms(source: str, extra: str) -> None:
    # models:/seed@champion/model read as stage "model" of a model named "seed@champion": no such model.
    with pytest.raises(ValueError, match=re.escape(f"has a path ({extra!r}) after the model")) as refused:
        parse_source(source)
    assert "models:/<name>@<alias>, models:/<name>/<version>" in str(refused.value)


def test_a_name_with_at_signs_keeps_its_versions_and_stages() -> None:
    assert parse_source("models:/team@seed/Production") == RunSource(model_name="team@seed", stage="Production")
    assert parse_source("models:/team@seed/latest") == RunSource(model_name="team@seed", stage="latest")


@pytest.mark.parametrize("name", ["abc", "my-bucket.v2", "unit-artifacts", "a" * 63, "1-2"])
def test_bucket_names_aws_takes_have_no_problem(name: str) -> None:
    assert bucket_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("My_Bucket", "lowercase letters"),
        ("ab", "3 to 63 characters"),
        ("a" * 64, "3 to 63 characters"),
        ("-abc", "beginning and ending"),
        ("a..b", "two adjacent periods"),
        ("192.168.0.1", "IP address"),
        ("xn--abc", "xn--..."),
        ("data--x-s3", "...--x-s3"),
    ],
)
def test_bucket_names_aws_refuses_name_the_rule(name: str, rule: str) -> None:
    problem = bucket_name_problem(name)
    assert problem is not None and rule in problem


def test_s3_uri_splits_into_bucket_and_key_and_joins() -> None:
    location = parse_s3_uri("s3://bucket/a/b/")
    assert (location.bucket, location.key) == ("bucket", "a/b/")
    assert str(location.join("c", "d.pt")) == "s3://bucket/a/b/c/d.pt"
    with pytest.raises(ValueError):
        parse_s3_uri("file:///tmp")


@pytest.mark.parametrize(
    ("name", "epoch"),
    [
        ("checkpoint-epoch-0003", 3),
        ("checkpoint-epoch-12345", 12345),
        ("checkpoint-epoch-\u00b9", None),
        ("checkpoint-epoch-", None),
        ("checkpoint-epoch-0003/checkpoint.pt", None),
        ("checkpoints/epoch_0003", None),
        ("state_dict", None),
        ("model", None),
    ],
)
def test_a_checkpoint_model_name_names_its_epoch_and_nothing_else_does(name: str, epoch: int | None) -> None:
    assert layout.key_of(name) == (None if epoch is None else ("epoch", epoch))


@pytest.mark.parametrize("key", [0, 3, 12345, 123456789])
@pytest.mark.parametrize("keyed_by", ["epoch", "step"])
def test_checkpoint_names_round_trip(key: int, keyed_by: str) -> None:
    assert layout.key_of(layout.checkpoint_name(key, keyed_by)) == (keyed_by, key)


def test_a_step_checkpoint_name_reads_as_a_step() -> None:
    assert layout.checkpoint_name(1500, "step") == "checkpoint-step-00001500"
    assert layout.key_of("checkpoint-step-00001500") == ("step", 1500)
    assert layout.key_of("checkpoint-steps-1500") is None
