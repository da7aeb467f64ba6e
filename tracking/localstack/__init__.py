"""The local development stack: SeaweedFS (S3) + ``mlflow server``, for trying the library and for tests.

Not part of the library: nothing in ``tracking`` imports this package; the ``tracking stack``
commands load it lazily.
"""

from tracking.localstack.services import HOST, SEAWEEDFS_PORT_COUNT
from tracking.localstack.settings import DEFAULT_BUCKET, DEFAULT_DATA_DIR, ENV_VARS, StackSettings
from tracking.localstack.stack import (
    ARTIFACT_PREFIX,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_S3_PORT,
    LOCAL_ACCESS_KEY_ID,
    LOCAL_SECRET_ACCESS_KEY,
    LocalStack,
    StackError,
)
from tracking.localstack.status import ServiceStatus, StackStatus

__all__ = [
    "ARTIFACT_PREFIX",
    "DEFAULT_BUCKET",
    "DEFAULT_DATA_DIR",
    "DEFAULT_MLFLOW_PORT",
    "DEFAULT_S3_PORT",
    "ENV_VARS",
    "HOST",
    "LOCAL_ACCESS_KEY_ID",
    "LOCAL_SECRET_ACCESS_KEY",
    "SEAWEEDFS_PORT_COUNT",
    "LocalStack",
    "ServiceStatus",
    "StackError",
    "StackSettings",
    "StackStatus",
]
