"""Settings, read from the standard MLflow/AWS variables plus a few ``TRACKING_*`` ones.

Precedence is explicit argument > environment > default, and the environment is
read only when :meth:`TrackingConfig.from_env` is called, never at import time.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tracking.errors import ConfigError

# What MLflow itself accepts for its boolean variables (case-insensitive): its S3 client reads
# MLFLOW_S3_IGNORE_TLS too, and raises a bare ValueError for anything else ("yes", "").
_TRUE = {"1", "true"}
_FALSE = {"0", "false"}

# Variable name for every field read from the environment.
ENV_VARS: dict[str, str] = {
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "s3_endpoint_url": "MLFLOW_S3_ENDPOINT_URL",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "aws_region": "AWS_DEFAULT_REGION",
    "s3_ignore_tls": "MLFLOW_S3_IGNORE_TLS",
    "s3_addressing_style": "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE",
    "experiment_name": "TRACKING_EXPERIMENT",
    "part_size_mb": "TRACKING_S3_PART_SIZE_MB",
    "max_concurrency": "TRACKING_S3_MAX_CONCURRENCY",
    "s3_connect_timeout": "TRACKING_S3_CONNECT_TIMEOUT",
    "s3_read_timeout": "TRACKING_S3_READ_TIMEOUT",
}

# The largest part (and single PUT) S3 takes, in MB: 5 GiB.
S3_MAX_PART_MB = 5 * 1024

# The most parallel transfers per file TRACKING_S3_MAX_CONCURRENCY takes: far past where S3 stops getting faster
# from one client, and well below where a typo (100000) would start threads by the hundred thousand.
MAX_CONCURRENCY = 256

# S3 attempts per request when neither AWS_MAX_ATTEMPTS nor an AWS profile sets them. With the
# default timeouts below, an endpoint that accepts connections and never answers fails in
# 2 x 15 s (+ under a second of backoff): "about 30 s", never minutes.
S3_MAX_ATTEMPTS = 2

# MLflow's HTTP client settings (mlflow.environment_variables), set by bound_mlflow_requests() where
# the user has not: each attempt waits at most the timeout, and there are 1 + retries attempts with
# backoff sleeps of 0, then factor * 2**(k-1) + up to 1 s of jitter, between them. Worst case for a
# server that accepts and never answers: 3 x 8 s + (0 + 2 x 1 + 1) s = 27 s; for a closed port ~3 s.
# MLflow's own defaults (120 s, 7 retries, factor 2) take ~4 minutes for a closed port, over 15 for
# a silent server.
MLFLOW_REQUEST_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


# MLflow's own defaults for what bound_mlflow_requests() leaves to it (its backoff jitter).
_MLFLOW_JITTER_DEFAULT = 1.0


def mlflow_request_bound(environ: Mapping[str, str] | None = None) -> float:
    """The longest one MLflow request may take against a silent server, from its current settings.

    Attempts x timeout plus the backoff sleeps between them (see :data:`MLFLOW_REQUEST_DEFAULTS`):
    27 s with the defaults bound_mlflow_requests() sets.
    """
    env = os.environ if environ is None else environ

    def number(var: str, default: float) -> float:
        try:
            return float(env.get(var) or default)
        except ValueError:
            return default  # MLflow itself refuses it, with its own message, at the first request

    timeout = number("MLFLOW_HTTP_REQUEST_TIMEOUT", 120)
    retries = int(number("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 7))
    factor = number("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 2)
    jitter = number("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", _MLFLOW_JITTER_DEFAULT)
    sleeps = sum(min(factor * 2.0 ** (k - 1), 120.0) + jitter for k in range(2, retries + 1))
    return float(timeout * (retries + 1) + sleeps)


# The region where neither AWS_DEFAULT_REGION nor the AWS profile names one: S3-compatible servers (MinIO,
# SeaweedFS) take any, but botocore needs some to sign a request.
DEFAULT_REGION = "us-east-1"


def default_region(environ: Mapping[str, str] | None = None) -> str:
    """The region boto3 would use, from ``environ`` (default ``os.environ``): ``AWS_DEFAULT_REGION``, else the
    ``region`` of the AWS profile (``AWS_DEFAULT_PROFILE`` or ``AWS_PROFILE``, else ``default``) in
    ``AWS_CONFIG_FILE`` (default ``~/.aws/config``), else :data:`DEFAULT_REGION`."""
    env = os.environ if environ is None else environ
    named = env.get("AWS_DEFAULT_REGION") or _profile_setting(env, "region")
    return named or DEFAULT_REGION


def _profile_setting(env: Mapping[str, str], name: str) -> str | None:
    """A setting of the AWS profile ``env`` names, as botocore reads its config file; None where it has none."""
    path, written = _config_file(env)
    if written is None:
        return None
    profile = env.get("AWS_DEFAULT_PROFILE") or env.get("AWS_PROFILE") or "default"
    value = _profiles(path, written).get(profile, {}).get(name)
    return value if isinstance(value, str) and value.strip() else None


def _config_file(env: Mapping[str, str]) -> tuple[str, tuple[int, int] | None]:
    """The AWS config file ``env`` names, and when it was written (mtime and size), None where there is none."""
    path = os.path.expanduser(os.path.expandvars(env.get("AWS_CONFIG_FILE") or "~/.aws/config"))
    try:
        stat = os.stat(path)
    except OSError:
        return path, None
    return path, (stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _profiles(path: str, written: tuple[int, int]) -> dict[str, Any]:
    """The profiles of an AWS config file, parsed by botocore; read again once the file changes."""
    import botocore.configloader
    import botocore.exceptions

    try:
        profiles = botocore.configloader.load_config(path).get("profiles", {})
    except (botocore.exceptions.BotoCoreError, OSError, UnicodeDecodeError):
        return {}  # botocore refuses the file with its own error at the first client: nothing to add here
    return profiles if isinstance(profiles, dict) else {}


def s3_attempts(environ: Mapping[str, str] | None = None) -> int:
    """Attempts per S3 request, as the S3 client takes them: ``AWS_MAX_ATTEMPTS``, else the AWS profile's
    ``max_attempts``, as botocore resolves them, else :data:`S3_MAX_ATTEMPTS`. Given ``environ``, only its
    ``AWS_MAX_ATTEMPTS`` is read."""
    if environ is not None:
        raw = environ.get("AWS_MAX_ATTEMPTS", "")
        return int(raw) if raw.strip().isdecimal() and int(raw) > 0 else S3_MAX_ATTEMPTS
    # A botocore session takes ~17 ms to build, once per multipart upload or failed commit: its answer is kept
    # for as long as what it reads is unchanged (a profile switched, or its file edited, is read again).
    path, written = _config_file(os.environ)
    return _resolved_attempts(tuple(os.environ.get(var) for var in _ATTEMPTS_VARS), path, written)


# What botocore reads to resolve max_attempts (the config file aside).
_ATTEMPTS_VARS = ("AWS_MAX_ATTEMPTS", "AWS_DEFAULT_PROFILE", "AWS_PROFILE", "AWS_CONFIG_FILE")


@functools.lru_cache(maxsize=8)
def _resolved_attempts(read: tuple[str | None, ...], path: str, written: tuple[int, int] | None) -> int:
    """botocore's max_attempts for the environment ``read`` and config file ``path`` (as ``written``)."""
    import botocore.exceptions
    import botocore.session

    try:
        # The one reading the S3 client's retries come from (see tracking.storage.s3_client): the bounds a
        # profile's max_attempts = 10 gives are the ones its requests take.
        resolved = botocore.session.get_session().get_config_variable("max_attempts")
        attempts = int(resolved) if resolved is not None else 0
    except (botocore.exceptions.BotoCoreError, ValueError, TypeError):
        attempts = 0  # a profile that is not there, or a value that is no number: refused with a clear error elsewhere
    return attempts if attempts > 0 else S3_MAX_ATTEMPTS


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are tracked and where their bytes are stored."""

    tracking_uri: str | None = None
    s3_endpoint_url: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    # Temporary keys (SSO, an assumed role, CI's OIDC) are refused without the token issued with them.
    aws_session_token: str | None = field(default=None, repr=False)
    # AWS_DEFAULT_REGION, else the AWS profile's region, else DEFAULT_REGION (see default_region).
    aws_region: str = field(default_factory=default_region)
    s3_ignore_tls: bool = False
    # Path-style by default: a bucket name with dots breaks TLS host names, and local stacks serve no other. A
    # store serving only bucket.host (OSS, some Ceph gateways) is set as for MLflow's own S3 client.
    s3_addressing_style: str = "path"
    experiment_name: str = "pytorch-checkpoints"
    part_size_mb: int = 16
    max_concurrency: int = 8
    # Seconds to open a connection to S3, and to wait for each socket read of a response (not for
    # the whole request: a large part or range keeps the connection busy, never idle that long).
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.tracking_uri is not None:
            _check_uri(self.tracking_uri, ENV_VARS["tracking_uri"], schemes=None)
        if not self.aws_region.strip():
            # botocore refused it at the first request, naming no variable.
            raise ConfigError(f"{ENV_VARS['aws_region']}={self.aws_region!r} is blank; set a region, e.g. us-east-1.")
        if self.s3_endpoint_url is not None:
            _check_uri(self.s3_endpoint_url, ENV_VARS["s3_endpoint_url"], schemes={"http", "https"})
        if self.s3_addressing_style not in ("path", "virtual", "auto"):
            raise ConfigError(
                f"{ENV_VARS['s3_addressing_style']}={self.s3_addressing_style!r}: must be path, virtual or auto, "
                "as botocore takes it; e.g. virtual for a store that serves buckets only as <bucket>.<host>."
            )
        if not self.experiment_name.strip():
            # Blank, the experiment was made with a name of spaces, that the UI shows as nothing.
            raise ConfigError(
                f"{ENV_VARS['experiment_name']}={self.experiment_name!r} is blank; set an experiment name."
            )
        if not 5 <= self.part_size_mb <= S3_MAX_PART_MB:
            # Above the maximum, every upload of a checkpoint over 5 GiB failed (EntityTooLarge), after the training.
            raise ConfigError(
                f"{ENV_VARS['part_size_mb']}={self.part_size_mb}: S3 multipart parts must be from 5 MB to "
                f"{S3_MAX_PART_MB} MB (5 GiB); e.g. 16, the default."
            )
        if not 1 <= self.max_concurrency <= MAX_CONCURRENCY:
            # Twice the value in part-upload threads start at the first upload, and as many connections to S3.
            raise ConfigError(
                f"{ENV_VARS['max_concurrency']}={self.max_concurrency}: must be from 1 to {MAX_CONCURRENCY} "
                "parallel transfers per file (2x as many threads start at the first upload); e.g. 8, the default."
            )
        for name in ("s3_connect_timeout", "s3_read_timeout"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ConfigError(f"{ENV_VARS[name]}={value}: must be a positive number of seconds, e.g. 15.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> TrackingConfig:
        """Build a config from ``environ`` (default ``os.environ``); ``overrides`` win over it.

        Overrides that are ``None`` are ignored, so CLI options can be passed through as they are.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or (raw == "" and types[name] != "bool"):
                continue
            values[name] = _parse(raw, str(types[name]), var)
        unknown = set(overrides) - set(types)
        if unknown:
            raise TypeError(f"unknown config fields: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "aws_region" not in values:
            values["aws_region"] = default_region(env)
        return cls(**values)

    @property
    def part_size(self) -> int:
        return self.part_size_mb * 1024 * 1024

    def s3_request_bound(self, attempts: int | None = None) -> float:
        """The longest one S3 request may wait on a silent or unreachable server: 31 s by default.

        Each of ``attempts`` (default :func:`s3_attempts`) waits at most the longer of the two
        timeouts; botocore's standard mode sleeps up to 2**k s (at most 20) between them.
        """
        n = s3_attempts() if attempts is None else attempts
        backoff = sum(min(2.0**k, 20.0) for k in range(n - 1))
        return n * max(self.s3_connect_timeout, self.s3_read_timeout) + backoff

    def operation_bound(self) -> float:
        """The longest any one request of a save or a load may take (S3's or the tracking server's).

        A failed operation's follow-up requests share what remains of it (see :mod:`tracking.deadline`).
        """
        return max(self.s3_request_bound(), mlflow_request_bound())

    def s3_client_env(self) -> dict[str, str]:
        """The variables MLflow's own S3 client and ``mlflow server`` read."""
        out: dict[str, str] = {"AWS_DEFAULT_REGION": self.aws_region}
        if self.s3_endpoint_url:
            out["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        if self.aws_access_key_id:
            out["AWS_ACCESS_KEY_ID"] = self.aws_access_key_id
        if self.aws_secret_access_key:
            out["AWS_SECRET_ACCESS_KEY"] = self.aws_secret_access_key
        if self.aws_session_token:
            out["AWS_SESSION_TOKEN"] = self.aws_session_token
        if self.s3_ignore_tls:
            out["MLFLOW_S3_IGNORE_TLS"] = "true"
        return out


def bound_mlflow_requests(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Bound MLflow's HTTP timeout and retries, so a dead or silent tracking server fails in under 30 s.

    Sets ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (8 s), ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (2) and
    ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` (1) in ``environ`` (default ``os.environ``), each only
    where it is unset, and returns what it set. MLflow reads them on every request, so this
    bounds every MLflow call of the process, the user's own included: that is the point, and
    setting any of the three beforehand opts out of it. ``import tracking`` calls it.
    """
    env = os.environ if environ is None else environ
    applied = {var: value for var, value in MLFLOW_REQUEST_DEFAULTS.items() if not env.get(var)}
    env.update(applied)
    return applied


# Variables MLflow and botocore parse themselves, deep inside a request, with a bare ValueError
# when malformed: the smallest value each accepts, and how they read it (all as int).
CLIENT_INT_VARS: dict[str, int] = {
    "AWS_MAX_ATTEMPTS": 1,
    "MLFLOW_HTTP_REQUEST_TIMEOUT": 1,
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 0,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 0,
}


def check_client_env(environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` naming the variable when one that MLflow or botocore reads is malformed.

    ``AWS_MAX_ATTEMPTS=abc`` or ``MLFLOW_HTTP_REQUEST_TIMEOUT=abc`` would otherwise fail later, in
    the middle of a request, as a ValueError with no variable named. Unset or empty is fine.
    """
    env = os.environ if environ is None else environ
    for var, smallest in CLIENT_INT_VARS.items():
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or value < smallest:
            raise ConfigError(
                f"{var}={env[var]!r} is not a whole number of at least {smallest}; fix or unset it "
                f"(e.g. {var}={MLFLOW_REQUEST_DEFAULTS.get(var, S3_MAX_ATTEMPTS)})."
            )


def _parse(raw: str, type_name: str, var: str) -> Any:
    if type_name == "bool":
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{var}={raw!r} is not a boolean MLflow reads; use true or false (or 1 or 0).")
    if type_name == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not an integer.") from None
    if type_name == "float":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not a number of seconds, e.g. 15 or 2.5.") from None
    if type_name == "Path":
        return Path(raw)
    return raw


# host:port with no scheme, e.g. "localhost:5000": MLflow would read it as a local folder.
_BARE_HOST_PORT = re.compile(r"[A-Za-z0-9.-]+:\d+(/.*)?")


def _check_uri(value: str, var: str, schemes: set[str] | None) -> None:
    example = "http://127.0.0.1:8333" if schemes is not None else "http://127.0.0.1:5000"
    # MLflow and botocore take the variable as it is: "   " became a local folder store named by the spaces, and
    # " http://host:5000 " an "Invalid url" with no variable named (urlparse below would drop the spaces).
    if not value.strip():
        raise ConfigError(f"{var}={value!r} is blank; unset it, or set a URL such as {example}.")
    if value != value.strip():
        raise ConfigError(
            f"{var}={value!r} has spaces around it, which MLflow and boto3 would keep; set {value.strip()!r}."
        )
    parsed = urlparse(value)
    if schemes is not None:
        if _BARE_HOST_PORT.fullmatch(value):
            raise ConfigError(f"{var}={value!r} has no scheme; use http://{value} (or https://).")
        if parsed.scheme not in schemes or not parsed.netloc:
            raise ConfigError(f"{var}={value!r} is not a valid URL; expected e.g. http://127.0.0.1:8333.")
        if parsed.path.strip("/") or parsed.query:
            # botocore puts the path in front of every key: the bytes would land under keys that
            # no reader with the bare endpoint ever looks at.
            raise ConfigError(
                f"{var}={value!r} has a path ({parsed.path!r}); an S3 endpoint is only scheme://host:port "
                f"(the bucket comes from the experiment's s3:// artifact root): use {parsed.scheme}://{parsed.netloc}."
            )
        return
    if _BARE_HOST_PORT.fullmatch(value):
        raise ConfigError(f"{var}={value!r} has no scheme; use http://{value} (or https://).")
    # A tracking URI may be a plain local path (MLflow accepts it), or scheme://...
    if parsed.scheme in {"http", "https"} and not parsed.netloc:
        raise ConfigError(f"{var}={value!r} is not a valid URL; expected e.g. {example}.")
    if " " in value:
        raise ConfigError(f"{var}={value!r} contains spaces; expected a URI such as http://127.0.0.1:5000.")
