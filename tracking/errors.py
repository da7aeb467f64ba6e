"""The exceptions the library raises on bad data, missing data and failing storage.

Programmer mistakes (wrong argument types, impossible values) raise the builtin
``TypeError`` / ``ValueError`` instead, so that ``except TrackingError`` only
catches conditions a user can act on.
"""

from __future__ import annotations


class TrackingError(Exception):
    """Base class: something about a run, its artifacts or the store is wrong."""


class ConfigError(TrackingError):
    """A setting (argument or environment variable) is missing or malformed."""


class NotFoundError(TrackingError):
    """A run, checkpoint, artifact, registry alias or class does not exist."""


class IntegrityError(TrackingError):
    """Stored bytes or a manifest do not match what was recorded, or are unreadable."""


class StorageError(TrackingError):
    """The artifact store could not be reached or refused an operation."""


class UnsafeClassError(TrackingError):
    """A recorded class path names something that must never be instantiated."""


class MismatchError(TrackingError):
    """Stored weights do not fit the model they are loaded into (keys or shapes differ)."""
