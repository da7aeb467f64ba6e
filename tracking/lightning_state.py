"""A Lightning Trainer checkpoint (manifest format ``"lightning"``) read as the core's: a plain dict (no Lightning
import), its fields under the keys tracking.log_checkpoint writes, and what a load of it leaves out said.
"""

from __future__ import annotations

from typing import Any

from tracking import layout
from tracking.errors import IntegrityError
from tracking.located import Located
from tracking.parallel import distributed

# Lightning's keys that become the core's; the others (loops, callbacks, hyper_parameters, ...) stay as extras.
_MAPPED = frozenset({"state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step"})


def as_core_state(located: Located, state: dict[str, Any]) -> dict[str, Any]:
    """A Lightning checkpoint's fields under the core's names (no Lightning import: it is a plain dict)."""
    if "state_dict" not in state:
        raise IntegrityError(
            f"run {located.run_id}: {located.label}: the Lightning checkpoint has no 'state_dict'; it was edited. "
            "Load another checkpoint (checkpoint=<epoch>)."
        )
    mapped = {k: v for k, v in state.items() if k not in _MAPPED}
    mapped["model_state"] = state["state_dict"]
    mapped["epoch"] = state.get("epoch")
    mapped["step"] = state.get("global_step")
    optimizers = state.get("optimizer_states") or []
    schedulers = state.get("lr_schedulers") or []
    if located.manifest.optimizers is not None:
        # Several optimizers, named by their index in Lightning's list; each scheduler by the optimizer it drives.
        if isinstance(optimizers, list) and optimizers:
            mapped["optim_state"] = {str(index): item for index, item in enumerate(optimizers)}
        if isinstance(schedulers, list) and schedulers and located.manifest.schedulers:
            # A missing or bad index leaves its name out: the check that follows refuses the state, naming it.
            positions = {name: d.get(layout.LR_SCHEDULERS_INDEX) for name, d in located.manifest.schedulers.items()}
            mapped["scheduler_state"] = {
                name: schedulers[index]
                for name, index in positions.items()
                if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(schedulers)
            }
        return mapped
    mapped["optim_state"] = optimizers[0] if isinstance(optimizers, list) and optimizers else None
    # Kept even when its init arguments could not be read back at the save: a scheduler given to restore, or a
    # factory given to load, takes it (pairing.build_schedulers leaves it out otherwise).
    if isinstance(schedulers, list) and schedulers and located.manifest.scheduler is not None:
        mapped["scheduler_state"] = schedulers[0]
    return mapped


def undescribed_states(located: Located, state: Any) -> None:
    """Warn, naming the run and the checkpoint, when a Lightning checkpoint holds optimizer or LR scheduler states
    its manifest does not describe, which a load leaves out: the optimizers after the first of a manifest written
    before the library described each, and the schedulers after the first of one optimizer."""
    manifest = located.manifest
    if manifest.format != "lightning" or not isinstance(state, dict):
        return
    left_out = []
    optimizers = state.get("optimizer_states")
    if manifest.optimizers is None and isinstance(optimizers, list) and len(optimizers) > 1:
        left_out.append(
            f"{len(optimizers) - 1} of its {len(optimizers)} optimizers (its manifest, written by an "
            "earlier version of torch-mlflow-tracking, describes the first alone)"
        )
    schedulers = state.get("lr_schedulers")
    described = len(manifest.schedulers) if manifest.schedulers is not None else int(manifest.scheduler is not None)
    if isinstance(schedulers, list) and len(schedulers) > described:
        left_out.append(
            f"{len(schedulers) - described} of its {len(schedulers)} LR schedulers (the first of each "
            "optimizer is rebuilt)"
        )
    if left_out:
        distributed.warn(  # once for the job: every rank loads it
            f"run {located.run_id}: {located.label} holds states that are left out of this load: "
            f"{' and '.join(left_out)}. Lightning's own resume restores them all: trainer.fit(model, "
            "ckpt_path=tracking.integrations.lightning.checkpoint_path(run_id)).",
            stacklevel=3,
        )
