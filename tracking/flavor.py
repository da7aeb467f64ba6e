"""MLflow's pytorch flavor (the whole model), imported without the Lightning autologging it does not need here."""

from __future__ import annotations

import sys
from types import ModuleType

_LIGHTNING_AUTOLOG = "mlflow.pytorch._lightning_autolog"


def pytorch_flavor() -> ModuleType:
    """``mlflow.pytorch``, imported on first use.

    Wherever Lightning is installed, ``import mlflow.pytorch`` also imports its Lightning
    autologging (pytorch_lightning, torchmetrics, transformers: over 3 s per process) for a
    callback that logging and loading a whole model never use. The first import made here
    leaves that module out, as the flavor itself does when Lightning is absent;
    ``mlflow.pytorch.autolog()`` still imports it when called.
    """
    loaded = sys.modules.get("mlflow.pytorch")
    if loaded is not None:
        return loaded
    skipped = _LIGHTNING_AUTOLOG not in sys.modules
    if skipped:
        sys.modules[_LIGHTNING_AUTOLOG] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import mlflow.pytorch
    finally:
        if skipped and sys.modules.get(_LIGHTNING_AUTOLOG, 0) is None:
            del sys.modules[_LIGHTNING_AUTOLOG]
    return mlflow.pytorch
