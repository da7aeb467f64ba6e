"""What a run without checkpoints offers instead: its state dict, its whole model, or a checkpoint to log."""

from __future__ import annotations

from tracking import layout
from tracking.errors import IntegrityError, NotFoundError, TrackingError
from tracking.located import state_dict
from tracking.run import RunHandle, tracking_server_errors


def what_else_loads(handle: RunHandle) -> str:
    """The advice for a run without checkpoints (one sentence): load its state dict, or its whole model, or log a
    checkpoint.

    Read only on that error's way: a state dict's manifest, and one search for the whole model. One that cannot
    be told now (the store or server failing) is left out of the advice rather than claimed.
    """
    run_id = handle.run_id
    log_one = "log a checkpoint with tracking.log_checkpoint(...) (or a Checkpointer)"
    try:
        state_dict(handle)
        held = True
    except IntegrityError:
        held = True  # there, but damaged: loading it says how
    except TrackingError:
        held = False  # none, or the store cannot tell now
    if held:
        return (
            f"its state dict loads with tracking.load_model({run_id!r}) (`--checkpoint state_dict` in the command "
            f"line), or {log_one}."
        )
    try:
        with tracking_server_errors(run_id, "looking for the run's whole model"):
            whole = handle.client.search_logged_models(
                experiment_ids=[handle.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{layout.MODEL_NAME}'",
                max_results=1,
            )
    except TrackingError:
        whole = []
    if whole:
        return (
            f"its whole model (tracking.log_model) loads with tracking.load_pickled_model({run_id!r}, "
            f"trust_pickle=True), which unpickles it: only for a run you trust; or {log_one}."
        )
    return f"it holds no state dict or whole model either: {log_one}."


def no_checkpoints(handle: RunHandle, missing: str) -> NotFoundError:
    """The refusal of a pick (``missing``: what was asked and not found) in a run that holds no checkpoint at all."""
    return NotFoundError(f"{missing}, nor any other: it holds no checkpoints; {what_else_loads(handle)}")
