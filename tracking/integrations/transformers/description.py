"""How a Trainer's save is described: its metrics at the save, the metric that ranks it, the objects' classes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers import TrainingArguments

from tracking import spec
from tracking.metrics import renamed

FORMAT = "transformers"
# log_history keys that are positions, totals or timings, not metrics of the checkpoint.
_NOT_METRICS = frozenset({"epoch", "step", "total_flos"})
_TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second")
# What the Trainer's MLflowCallback replaces with "_" in a metric's name (transformers.integrations).
_NOT_IN_MLFLOW_NAMES = re.compile(r"[^0-9A-Za-z_\-\.\ :/]")


def checkpoint_metrics(entries: Sequence[Mapping[str, Any]], step: int) -> dict[str, float]:
    """The metrics of ``entries`` (the Trainer's log_history, and the last evaluation's) at global step ``step``,
    finite numbers only; a later entry's value wins."""
    metrics: dict[str, float] = {}
    for entry in entries:
        if entry.get("step", step) != step:
            continue
        for name, value in entry.items():
            if name in _NOT_METRICS or name.endswith(_TIMINGS):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                metrics[name] = float(value)
    return renamed(metrics, metric_key)


def metric_key(name: str) -> str:
    """The key the Trainer's MLflowCallback logs metric ``name`` by (``eval_acc(top1)`` as ``eval_acc_top1_``):
    a checkpoint's metrics take it, so that MLflow accepts them and they chart with the Trainer's."""
    return _NOT_IN_MLFLOW_NAMES.sub("_", name)


def monitor_of(args: TrainingArguments) -> tuple[str | None, str]:
    """The metric that ranks checkpoints, under its key among a checkpoint's metrics (:func:`metric_key` of the
    name the Trainer gives it in its eval logs), and min/max."""
    name = args.metric_for_best_model
    if not name:
        return None, "min"
    monitor = metric_key(name if name.startswith("eval_") else f"eval_{name}")
    greater = args.greater_is_better
    if greater is None:
        greater = not name.endswith("loss")  # the Trainer's own default
    return monitor, "max" if greater else "min"


def describe_model(model: nn.Module | None) -> dict[str, Any]:
    """The model's class and how to rebuild it (its own ``from_pretrained`` for a PreTrainedModel)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"the Trainer handed the callback no torch.nn.Module, got {type(model).__name__}")
    if callable(getattr(type(model), "from_pretrained", None)):
        # A PreTrainedModel is rebuilt by its own from_pretrained from the checkpoint's config.json.
        return {"class": spec.class_path(model), "init_kwargs": {}, "init_kwargs_source": "from_pretrained"}
    return spec.describe_model(model, None)


def describe_optimizer(optimizer: Any, model: nn.Module | None) -> dict[str, Any] | None:
    """The optimizer's class and arguments, when its parameters are the model's; else None."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    if inner is None or model is None:
        return None
    try:
        return spec.describe_optimizer(inner, model)
    except ValueError:
        return None  # parameters outside the model: loading then needs optimizer=<factory>


def describe_scheduler(scheduler: Any) -> dict[str, Any] | None:
    """The scheduler's class and arguments, None without one."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps torch's
    if inner is None:
        return None
    return spec.describe_scheduler(inner, None)
