"""Parsing of the strings users hand us: run sources and S3 artifact locations."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlparse

# S3's naming rules for a general purpose bucket (AWS S3 user guide, "Bucket naming rules"). MinIO,
# SeaweedFS and moto take more, so a name that works in tests or on a local stack can fail on AWS.
_BUCKET_CHARACTERS = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


@dataclass(frozen=True)
class RunSource:
    """A run ID, a logged model ID, or the registry model (name + alias, version or stage) that leads to one.

    ``stage`` is ``latest`` (any case: the newest version) or one of MLflow's deprecated stages
    (``Production``...: the newest version in it), as ``models:/<name>/<stage>`` means in MLflow.
    """

    run_id: str | None = None
    model_id: str | None = None
    model_name: str | None = None
    alias: str | None = None
    version: str | None = None
    stage: str | None = None
    artifact_path: str = ""


# What a models:/ URI may be, for the error when it is none of them.
_MODELS_FORMS = "models:/<model_id>, models:/<name>@<alias>, models:/<name>/<version> or models:/<name>/latest"


# What a run ID may be: MLflow's own rule (mlflow.utils.validation._RUN_ID_REGEX), which its stores refuse a
# request by. MLflow's servers issue 32 hex characters (uuid4().hex), but other servers that speak its API issue
# other IDs (Azure Machine Learning's are its job names, which users choose): anything MLflow takes is the
# server's to find or not.
_RUN_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")
# What a run ID of an MLflow server looks like, for a refusal or a run not found.
RUN_ID_SHAPE = "32 hex characters, e.g. 3f2a9c0d1b2e4f5a6b7c8d9e0f1a2b3c"
_ISSUED = re.compile(r"[0-9a-f]{32}")


def looks_issued(run_id: str) -> bool:
    """Whether ``run_id`` has the shape of the run IDs MLflow's own servers issue (32 lowercase hex characters)."""
    return _ISSUED.fullmatch(run_id) is not None


def _check_run_id(run_id: str, source: str) -> None:
    if _RUN_ID.fullmatch(run_id) is None:
        raise ValueError(
            f"{_named(run_id, source)} is not a run ID: a run ID is {RUN_ID_SHAPE} (letters, digits, '_' and '-' "
            "on other servers), as the MLflow UI shows it; also runs:/<run_id>, models:/<model_id> or "
            "models:/<name>@<alias>"
        )


def _named(run_id: str, source: str) -> str:
    return repr(source) if run_id == source else f"{source!r}: {run_id!r}"


def parse_source(source: str) -> RunSource:
    """Parse ``<run_id>``, ``runs:/<run_id>[/path]``, ``models:/<model_id>``, ``models:/<name>@<alias>``,
    ``models:/<name>/<version>`` or ``models:/<name>/latest`` (or ``/<stage>``), as MLflow reads them."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            f"source must be a run ID, runs:/<run_id>, models:/<model_id> or models:/<name>@<alias>, got {source!r}"
        )
    source = source.strip()
    if source.startswith("runs:/"):
        parts = source[len("runs:/") :].strip("/").split("/", 1)
        if not parts[0]:
            raise ValueError(f"{source!r} has no run ID; expected runs:/<run_id>[/path]")
        _check_run_id(parts[0], source)
        return RunSource(run_id=parts[0], artifact_path=parts[1] if len(parts) > 1 else "")
    if source.startswith("models:/"):
        return _parse_models_uri(source)
    if source.startswith("m-"):  # run IDs are hex: this is a logged model's ID, as the MLflow UI and listings show it
        raise ValueError(f"{source!r} is a logged model ID, not a run ID; pass models:/{source}")
    _check_run_id(source, source)
    return RunSource(run_id=source)


def _parse_models_uri(source: str) -> RunSource:
    # In MLflow's order: a suffix after the name's "/" first (a name holds no "/" but may hold "@"),
    # then the alias after the last "@", else a logged model's ID.
    parts = source[len("models:/") :].strip("/").split("/")
    if len(parts) == 2 and parts[0].strip() and parts[1].strip():
        name, suffix = parts
        if suffix.isdigit() and suffix.isascii():
            return RunSource(model_name=name, version=suffix)
        if "@" in name and suffix.lower() not in _STAGES:
            # models:/seed@champion/model: an alias with an artifact path after it, which MLflow would read as
            # stage "model" of a model named "seed@champion", to fail as no such model.
            _refuse_extra_path(source, suffix)
        return RunSource(model_name=name, stage=suffix)
    if len(parts) > 2 and all(p.strip() for p in parts[:2]):
        _refuse_extra_path(source, "/".join(parts[1 if "@" in parts[0] else 2 :]))
    if len(parts) == 1 and "@" in parts[0]:
        name, _, alias = parts[0].rpartition("@")
        if name.strip() and alias.strip():
            return RunSource(model_name=name, alias=alias)
    elif len(parts) == 1 and parts[0].startswith("m-"):
        return RunSource(model_id=parts[0])
    raise ValueError(f"{source!r} is not {_MODELS_FORMS}")


# The suffixes after a name that MLflow reads as a stage: its deprecated stages, and latest.
_STAGES = frozenset({"latest", "none", "staging", "production", "archived"})


def _refuse_extra_path(source: str, extra: str) -> None:
    raise ValueError(
        f"{source!r} has a path ({extra!r}) after the model it names; a models:/ URI names a logged model, or a "
        f"registered model's alias, version or stage, with nothing after it: {_MODELS_FORMS}"
    )


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    def join(self, *parts: str) -> S3Location:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Location(self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Location:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return S3Location(parsed.netloc, parsed.path.lstrip("/"))


def bucket_name_problem(name: str) -> str | None:
    """The rule of S3's that a bucket named ``name`` breaks, in words; None when AWS S3 takes the name."""
    if not _BUCKET_CHARACTERS.fullmatch(name):
        return (
            "a bucket name is 3 to 63 characters of lowercase letters, digits, '.' and '-', "
            "beginning and ending with a letter or digit"
        )
    if ".." in name:
        return "a bucket name has no two adjacent periods"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return "a bucket name is not formatted as an IP address"
    if name.startswith(_BUCKET_RESERVED_PREFIXES) or name.endswith(_BUCKET_RESERVED_SUFFIXES):
        reserved = ", ".join(
            (*(f"{p}..." for p in _BUCKET_RESERVED_PREFIXES), *(f"...{s}" for s in _BUCKET_RESERVED_SUFFIXES))
        )
        return f"a bucket name does not begin or end as AWS reserves ({reserved})"
    return None
