"""What a checkpoint's metrics may be: finite numbers, under names MLflow accepts.

Checked before anything is stored: MLflow's refusal would come after the whole upload, as a
tracking-server error that no retry fixes.
"""

from __future__ import annotations

import math
import numbers
import posixpath
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

# MLflow's rule for metric names (mlflow.utils.validation), checked on the client side before the upload.
MAX_METRIC_NAME = 250
_METRIC_NAME = re.compile(r"[/\w.\- :]*")


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        try:
            number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an int beyond float range
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")
        problem = metric_name_problem(str(name))
        if problem is not None:
            raise ValueError(f"metric name {str(name)[:100]!r} {problem}; rename it in metrics=")
        out[str(name)] = number
    return out


def metric_name_problem(name: str) -> str | None:
    """Why MLflow would refuse ``name`` as a metric name (None when it takes it).

    Checked before anything is stored: MLflow's refusal would come after the whole upload,
    as a tracking-server error that no retry fixes.
    """
    if not name:
        return "is empty"
    if len(name) > MAX_METRIC_NAME:
        return f"is {len(name)} characters long, more than the {MAX_METRIC_NAME} MLflow accepts"
    if not _METRIC_NAME.fullmatch(name):
        return "holds characters MLflow refuses: use letters, digits, _ - . / : and spaces"
    normal = posixpath.normpath(name)
    if normal != name or normal.startswith(("..", "/")):
        return f"is a path that MLflow refuses (it would resolve to {normal!r})"
    return None


def renamed(metrics: Mapping[str, float], rename: Callable[[str], str]) -> dict[str, float]:
    """``metrics`` under the names ``rename`` gives them (a framework's own MLflow logger's renaming of the
    characters MLflow refuses), so that a checkpoint's metrics are the keys that logger charts; a name MLflow
    refuses even so (too long, a path) is left out with a warning, not left to fail the checkpoint's commit."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        key = rename(name)
        problem = metric_name_problem(key)
        if problem is None:
            out[key] = value
        else:
            warnings.warn(
                f"metric {name!r} is not logged with the checkpoint: its name {problem}", RuntimeWarning, stacklevel=2
            )
    return out
