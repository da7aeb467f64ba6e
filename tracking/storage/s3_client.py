"""The boto3 S3 client the fast path talks through: credentials, endpoint, timeouts, retries, one per config.

Clients are built here and nowhere else in the library; every session reads botocore's service
models through one loader per process (:func:`boto3_session`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from tracking.config import S3_MAX_ATTEMPTS, TrackingConfig
from tracking.errors import ConfigError


@functools.lru_cache(maxsize=8)
def s3_client(config: TrackingConfig) -> Any:
    """One boto3 client per configuration: clients are thread-safe and costly to build.

    Timeouts come from ``config``; attempts and retry mode from botocore's own
    ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` (or the AWS profile), read when the client is built,
    with :data:`tracking.config.S3_MAX_ATTEMPTS` standard-mode attempts where neither sets them.
    """
    import botocore.exceptions

    if not config.aws_access_key_id and not _has_other_credentials() and not _botocore_finds_credentials():
        raise ConfigError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or an AWS profile), e.g. from `tracking stack up`."
        )
    try:
        return _client(config)
    except botocore.exceptions.ProfileNotFound as exc:
        files = " or ".join(
            os.environ.get(var, default)
            for var, default in (
                ("AWS_CONFIG_FILE", "~/.aws/config"),
                ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
            )
        )
        raise ConfigError(
            f"AWS_PROFILE={os.environ.get('AWS_PROFILE')!r} names no profile in {files} ({exc}); fix the "
            "name (`aws configure list-profiles` lists them) or unset AWS_PROFILE and set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY."
        ) from exc


def boto3_session(**settings: Any) -> Any:
    """A new ``boto3.session.Session(**settings)`` that reads botocore's data through this process's one loader.

    A new session otherwise parses botocore's JSON service models again: about 0.1 s of CPU and 7 MB for S3
    alone, for every client made after a credential or endpoint change. The data never changes in a process.
    """
    import boto3
    import botocore.session

    core = settings.pop("botocore_session", None) or botocore.session.get_session()
    loader = _data_loader(core.get_config_variable("data_path"))
    core.register_component("data_loader", loader)
    session = boto3.session.Session(botocore_session=core, **settings)
    # boto3 adds its own data folder to the loader's search path with every session: once is enough.
    loader.search_paths[:] = dict.fromkeys(loader.search_paths)
    return session


@functools.lru_cache(maxsize=4)
def _data_loader(data_path: str | None) -> Any:
    import botocore.loaders

    return botocore.loaders.create_loader(data_path)


def _client(config: TrackingConfig) -> Any:
    import botocore.session
    from botocore.config import Config

    core = botocore.session.get_session()
    # A `retries` in Config overrides botocore's environment and profile settings, so pass our
    # bound only where the user set none; the retry mode is left to botocore (its default: standard).
    user_attempts = core.get_config_variable("max_attempts") is not None
    retries: Any = None if user_attempts else {"total_max_attempts": S3_MAX_ATTEMPTS}
    # One of the three botocore takes: TrackingConfig refuses any other.
    s3_settings: Any = {"payload_signing_enabled": False, "addressing_style": config.s3_addressing_style}
    botocore_config = Config(
        region_name=config.aws_region,
        max_pool_connections=max(10, config.max_concurrency * 2),
        retries=retries,
        connect_timeout=config.s3_connect_timeout,
        # Per socket read, not per request: a large part or range streams for as long as it needs.
        read_timeout=config.s3_read_timeout,
        # The manifest's sha256 covers every byte end to end; skip botocore's own
        # per-request payload hashing and CRC checksums, which would hash it all twice more.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3=s3_settings,
    )
    session = boto3_session(
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
        # A token alone is no credentials: botocore would then sign with no key at all.
        aws_session_token=config.aws_session_token if config.aws_access_key_id else None,
        region_name=config.aws_region,
        botocore_session=core,
    )
    return session.client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        verify=not config.s3_ignore_tls,
        config=botocore_config,
    )


def _has_other_credentials() -> bool:
    return any(k in os.environ for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE"))


def _botocore_finds_credentials() -> bool:
    """True when botocore's own chain finds credentials none of the variables above name: the default profile of
    ~/.aws/credentials (what `aws configure` writes), an instance or container role. Asked only when those
    variables are unset, since the chain's last steps may ask the instance's metadata service (about a second
    where there is none)."""
    import botocore.exceptions
    import botocore.session

    try:
        return botocore.session.get_session().get_credentials() is not None
    except botocore.exceptions.BotoCoreError:
        return False  # a malformed credentials file: the refusal below says what to set
