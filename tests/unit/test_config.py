"""Settings: no torch, no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracking.config import TrackingConfig, check_client_env
from tracking.errors import ConfigError


def test_defaults_without_environment() -> None:
    config = TrackingConfig.from_env({})
    assert config.tracking_uri is None
    assert (config.experiment_name, config.s3_ignore_tls) == ("pytorch-checkpoints", False)


def test_environment_then_explicit_argument_wins() -> None:
    env = {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:8333",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "MLFLOW_S3_IGNORE_TLS": "true",
        "TRACKING_EXPERIMENT": "from-env",
        "TRACKING_S3_PART_SIZE_MB": "32",
    }
    config = TrackingConfig.from_env(env, experiment_name="explicit", tracking_uri=None)
    assert config.experiment_name == "explicit"
    assert config.tracking_uri == "http://127.0.0.1:5000"
    assert config.s3_ignore_tls is True
    assert config.part_size == 32 * 1024 * 1024
    assert config.s3_client_env()["AWS_SECRET_ACCESS_KEY"] == "secret"


def test_secrets_stay_out_of_repr() -> None:
    config = TrackingConfig.from_env({"AWS_SECRET_ACCESS_KEY": "hunter2", "AWS_ACCESS_KEY_ID": "AKIA"})
    assert "hunter2" not in repr(config) and "AKIA" not in repr(config)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MLFLOW_S3_IGNORE_TLS": "maybe"}, "MLFLOW_S3_IGNORE_TLS"),
        ({"MLFLOW_S3_ENDPOINT_URL": "localhost:9000"}, "MLFLOW_S3_ENDPOINT_URL"),
        ({"MLFLOW_TRACKING_URI": "http://"}, "MLFLOW_TRACKING_URI"),
        ({"TRACKING_S3_PART_SIZE_MB": "big"}, "TRACKING_S3_PART_SIZE_MB"),
        ({"TRACKING_S3_PART_SIZE_MB": "1"}, "TRACKING_S3_PART_SIZE_MB"),
        # Above S3's 5 GiB a part, every checkpoint over 5 GiB failed to upload after the training.
        ({"TRACKING_S3_PART_SIZE_MB": "5121"}, "TRACKING_S3_PART_SIZE_MB=5121: .* from 5 MB to 5120 MB"),
        ({"TRACKING_S3_MAX_CONCURRENCY": "0"}, "TRACKING_S3_MAX_CONCURRENCY=0: must be from 1 to 256"),
        # Twice the value in threads started at the first upload: a typo of 100000 started 200,000.
        ({"TRACKING_S3_MAX_CONCURRENCY": "100000"}, "TRACKING_S3_MAX_CONCURRENCY=100000: must be from 1 to 256"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        TrackingConfig.from_env(env)


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        # MLflow made a folder store named by the spaces, and failed on its maintenance notice.
        ("MLFLOW_TRACKING_URI", "   ", "is blank; unset it, or set a URL such as http://127.0.0.1:5000."),
        # MLflow: "Invalid url:  http://127.0.0.1:5000 /api/2.0/...", no variable named.
        ("MLFLOW_TRACKING_URI", " http://127.0.0.1:5000 ", "has spaces around it, which MLflow and boto3 would keep"),
        ("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:8333 ", "has spaces around it"),
        ("MLFLOW_S3_ENDPOINT_URL", "127.0.0.1:8333", "has no scheme; use http://127.0.0.1:8333 (or https://)."),
        # An experiment named by spaces, shown as nothing in the UI.
        ("TRACKING_EXPERIMENT", "  ", "is blank; set an experiment name."),
        # botocore's InvalidRegionError at the first request, naming no variable.
        ("AWS_DEFAULT_REGION", " ", "is blank; set a region, e.g. us-east-1."),
    ],
)
def test_blank_spaced_or_schemeless_values_are_refused_naming_the_variable(
    variable: str, value: str, said: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        TrackingConfig.from_env({variable: value})
    assert str(refused.value).startswith(f"{variable}={value!r} {said}")


def test_unknown_override_is_a_programmer_error() -> None:
    with pytest.raises(TypeError, match="unknown config fields"):
        TrackingConfig.from_env({}, buckett="x")


def test_the_environment_is_read_when_asked_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKING_EXPERIMENT", "set-after-import")
    assert TrackingConfig.from_env().experiment_name == "set-after-import"


def test_public_api_is_importable_and_lazy() -> None:
    import subprocess
    import sys

    import tracking

    assert set(tracking.__all__) == set(tracking._EXPORTS)
    for name in tracking.__all__:
        assert getattr(tracking, name) is not None
    probe = "import sys, tracking.cli; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_each_public_name_stays_what_its_module_defines_once_every_module_is_imported() -> None:
    import importlib

    import tracking

    # Importing a submodule binds its name on the package: one named like a public function would shadow it.
    for module in sorted(set(tracking._EXPORTS.values())):
        importlib.import_module(module)
    for name, module in tracking._EXPORTS.items():
        assert getattr(tracking, name) is getattr(importlib.import_module(module), name), name


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AWS_MAX_ATTEMPTS", "abc"),
        ("AWS_MAX_ATTEMPTS", "0"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "abc"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "2.5"),  # MLflow reads it with int()
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "-1"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "x"),
    ],
)
def test_malformed_client_variables_name_themselves(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}='{re.escape(value)}' is not a whole number"):
        check_client_env({variable: value})


def test_well_formed_or_unset_client_variables_pass() -> None:
    check_client_env({})
    check_client_env(
        {"AWS_MAX_ATTEMPTS": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": " 30 ", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    )
    check_client_env({"AWS_MAX_ATTEMPTS": ""})


def test_the_s3_request_bound_counts_an_aws_profiles_max_attempts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README says a profile's max_attempts counts: the S3 client took it, but the bound (and every deadline
    built on it) counted AWS_MAX_ATTEMPTS alone, and cut a profile's third attempt short."""
    (tmp_path / "config").write_text("[profile patient]\nmax_attempts = 5\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "patient")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    config = TrackingConfig(s3_connect_timeout=5, s3_read_timeout=15)

    assert config.s3_request_bound() == 5 * 15 + (1 + 2 + 4 + 8)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # the variable wins over the profile, as botocore reads them
    assert config.s3_request_bound() == 3 * 15 + (1 + 2)


@pytest.fixture
def aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An AWS config file of this test's own, named by AWS_CONFIG_FILE, and no region or profile from outside."""
    for var in ("AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(path))
    return path


def test_an_unset_region_is_the_aws_profiles_as_boto3_resolves_it(
    aws_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The region was us-east-1 whatever the AWS profile said, where boto3 itself takes the profile's region: a
    bucket in eu-west-3 was asked for in the wrong region."""
    import botocore.session

    aws_config.write_text("[default]\nregion = ap-south-1\n[profile paris]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_PROFILE", "paris")

    assert TrackingConfig.from_env().aws_region == "eu-west-3"
    assert TrackingConfig().aws_region == "eu-west-3"
    assert botocore.session.get_session().get_config_variable("region") == "eu-west-3"  # what boto3 takes
    monkeypatch.delenv("AWS_PROFILE")
    assert TrackingConfig.from_env().aws_region == "ap-south-1"
    # The chain reads the environment it is given, as every other setting does.
    assert TrackingConfig.from_env({"AWS_CONFIG_FILE": str(aws_config), "AWS_PROFILE": "paris"}).aws_region == (
        "eu-west-3"
    )
    # explicit argument > environment > profile > default
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    assert TrackingConfig.from_env().aws_region == "eu-north-1"
    assert TrackingConfig.from_env(aws_region="us-west-2").aws_region == "us-west-2"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    aws_config.write_text("[profile other]\nregion = eu-west-3\n")  # nothing names one: what S3 servers take
    assert TrackingConfig.from_env().aws_region == "us-east-1"
    monkeypatch.setenv("HOME", str(aws_config.parent))  # whatever ~/.aws/config this machine has
    assert TrackingConfig.from_env({}).aws_region == "us-east-1"


def test_s3_attempts_builds_no_botocore_session_per_call_yet_sees_a_changed_profile(
    aws_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call built a botocore session (~17 ms, once per multipart upload or failed commit) to read one value."""
    import os

    import botocore.session

    from tracking.config import s3_attempts

    built: list[object] = []
    get_session = botocore.session.get_session
    monkeypatch.setattr(botocore.session, "get_session", lambda *a, **k: built.append(1) or get_session(*a, **k))
    aws_config.write_text("[profile patient]\nmax_attempts = 5\n[profile hasty]\nmax_attempts = 1\n")
    monkeypatch.setenv("AWS_PROFILE", "patient")

    assert [s3_attempts() for _ in range(20)] == [5] * 20
    assert len(built) == 1
    monkeypatch.setenv("AWS_PROFILE", "hasty")  # another profile named
    assert s3_attempts() == 1
    aws_config.write_text("[profile hasty]\nmax_attempts = 7\n")  # the file edited
    os.utime(aws_config, ns=(1, 1))  # however fine the clock of the file system
    assert s3_attempts() == 7
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # the variable wins, as botocore reads them
    assert s3_attempts() == 3
