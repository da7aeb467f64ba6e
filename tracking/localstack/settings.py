"""The local stack's own settings: which bucket it creates and where it keeps its state.

They are read from ``TRACKING_BUCKET`` and ``TRACKING_DATA_DIR`` only when
:meth:`StackSettings.from_env` is called, never at import time; an explicit argument wins
over the environment, which wins over the default. The library's
:class:`~tracking.config.TrackingConfig` does not know them: clients find the bucket in the
experiment's artifact location.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tracking.errors import ConfigError

DEFAULT_BUCKET = "mlflow"
DEFAULT_DATA_DIR = Path(".tracking")

# Variable name for every field read from the environment.
ENV_VARS: dict[str, str] = {
    "bucket": "TRACKING_BUCKET",
    "data_dir": "TRACKING_DATA_DIR",
}


@dataclass(frozen=True)
class StackSettings:
    """The bucket the local stack creates and uses, and the folder that holds its state."""

    bucket: str = DEFAULT_BUCKET
    data_dir: Path = DEFAULT_DATA_DIR

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ConfigError(f"{ENV_VARS['bucket']}={self.bucket!r} is not a bucket name; use e.g. 'mlflow'.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> StackSettings:
        """Build settings from ``environ`` (default ``os.environ``); ``overrides`` win over it.

        Overrides that are ``None`` are ignored, so CLI options can be passed through as they are.
        """
        env = os.environ if environ is None else environ
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown stack settings: {sorted(unknown)}")
        values: dict[str, Any] = {}
        if env.get(ENV_VARS["bucket"]):
            values["bucket"] = env[ENV_VARS["bucket"]]
        if env.get(ENV_VARS["data_dir"]):
            values["data_dir"] = Path(env[ENV_VARS["data_dir"]])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        return cls(**values)
