"""Where artifact bytes go: one small interface, two implementations.

``S3Store`` (:mod:`tracking.storage.s3`) is the fast path for ``s3://`` artifact roots;
``MlflowStore`` (:mod:`tracking.storage.artifact_repo`) serves every other root through
MLflow's own artifact repository. Both produce the same layout, so the rest of the
library never asks which it has. boto3 is imported here and nowhere else in the library.
"""

from __future__ import annotations

from tracking.config import TrackingConfig
from tracking.storage.base import ArtifactStore, Buffer, BufferReader, Producer, StableProducer

__all__ = ["ArtifactStore", "Buffer", "BufferReader", "Producer", "StableProducer", "open_store"]


def open_store(artifact_uri: str, config: TrackingConfig, owner: str = "") -> ArtifactStore:
    """The fast S3 store for an ``s3://`` artifact root, MLflow's repository otherwise.

    ``owner`` names what the root belongs to (``run <id>``) in error messages. A local path behind a
    tracking server on another host is warned about (:mod:`tracking.storage.local_root`).
    """
    if artifact_uri.startswith("s3://"):
        from tracking.storage.s3 import S3Store

        return S3Store(artifact_uri, config, owner)
    import mlflow

    from tracking.storage.artifact_repo import MlflowStore
    from tracking.storage.local_root import warn_if_local_root

    warn_if_local_root(artifact_uri, config.tracking_uri or mlflow.get_tracking_uri(), owner)
    return MlflowStore(artifact_uri, owner)
