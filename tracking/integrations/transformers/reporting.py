"""The Trainer's own MLflow logging (``report_to="mlflow"``), kept from ending runs it did not start.

transformers' ``MLflowCallback`` starts a run when none is active, marks it its own (``_auto_end_run``) and
ends it at the end of ``train()``, but leaves the mark set. Its ``__del__`` then ends whichever run is active
when the dropped Trainer is collected (the next trial of a sweep, the next notebook cell, maybe mid-training),
and a later ``train()`` of the same Trainer ends, at its end, the run the user goes on in. ``TrackingCallback``
follows every ``MLflowCallback`` of its Trainer (:func:`follow`: it goes last) and, once their ``on_train_end``
has ended their own runs, clears the mark (:func:`disarm`). A run ``MLflowCallback`` merely logged into is never
its own, and nothing here ends a run.

transformers hands a callback neither its Trainer nor the Trainer's other callbacks: the ``CallbackHandler``
calling the event holds them (:func:`calling_handler`).
"""

from __future__ import annotations

import inspect

from transformers import TrainerCallback
from transformers.integrations.integration_utils import MLflowCallback
from transformers.trainer_callback import CallbackHandler

# How far up calling_handler looks: past the event method that called it (or a helper of it) to call_event.
_DEPTH = 4


def calling_handler() -> CallbackHandler | None:
    """The Trainer's ``CallbackHandler`` whose event called the caller of this function (an event method of a
    callback); None where the event was called otherwise (a test calling it, another framework's loop)."""
    frame = inspect.currentframe()
    for _ in range(_DEPTH):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            return handler
    return None


def follow(handler: CallbackHandler, ours: TrainerCallback) -> None:
    """Move ``ours`` to the end of ``handler``'s callbacks, so that at each event it sees what every other one made
    of it: at the end of ``train()`` each ``MLflowCallback`` (a user's ``callbacks=[TrackingCallback(...),
    MLflowCallback()]`` too) has ended its own run when ours disarms it; at an evaluation the metrics are final
    and an ``EarlyStoppingCallback`` has decided whether training stops there.

    The list is replaced, not changed in place: the handler is iterating the old one for the event under way.
    """
    callbacks = list(handler.callbacks)
    if ours not in callbacks or callbacks[-1] is ours:
        return
    callbacks.remove(ours)
    callbacks.append(ours)
    handler.callbacks = callbacks


def disarm(handler: CallbackHandler, ours: TrainerCallback) -> None:
    """Clear the own-run mark of each ``MLflowCallback`` before ``ours`` in ``handler``: their ``on_train_end``
    has ended their own runs, and any run active later is someone else's."""
    callbacks = list(handler.callbacks)
    before = callbacks[: callbacks.index(ours)] if ours in callbacks else []
    for callback in before:
        # _auto_end_run is private to transformers: a version without it (or one that clears it itself) is left
        # as it is. True only where MLflowCallback started the run itself (not the user's run it logged into).
        if isinstance(callback, MLflowCallback) and getattr(callback, "_auto_end_run", None) is True:
            callback._auto_end_run = False
