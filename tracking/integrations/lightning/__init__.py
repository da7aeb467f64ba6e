"""PyTorch Lightning: every checkpoint ``ModelCheckpoint`` writes becomes a checkpoint logged model of the run.

One line attaches it::

    trainer = pl.Trainer(callbacks=[ModelCheckpoint(monitor="val_loss"), MLflowCheckpoints()])

and resuming by run ID is Lightning's own resume, fed from the run::

    trainer.fit(model, ckpt_path=checkpoint_path(run_id))  # or "best", an epoch or step, models:/...

:class:`MLflowCheckpoints` wraps the strategy's ``CheckpointIO`` (inside Lightning's
``AsyncCheckpointIO`` when there is one, so the upload runs in its thread once the local file is
written). Each file Lightning writes is committed as it is (``checkpoint.pt``, manifest format
``"lightning"``) with its epoch, global step and the trainer's metrics at the save, keyed by its
epoch, or by its global step when a ``ModelCheckpoint`` of the fit saves by step
(``every_n_train_steps``, ``train_time_interval``: then every save of an epoch stays); a second
save of the same epoch and step (``last.ckpt``) is the same logged model, not another upload; a
file ``ModelCheckpoint`` removes (``save_top_k``) removes its logged model once no kept file is it;
the run's latest/best tags follow ``ModelCheckpoint``'s ``monitor`` and ``mode``. The callback also
keeps the RNG states in the checkpoint (its own callback state), so that a resume draws the same
batches and dropout masks as a run that never stopped (mid-epoch too, with a resumable DataLoader).

Its modules: ``callback`` (:class:`MLflowCheckpoints`), ``mirror`` (the CheckpointIO that commits
each saved file), ``kept`` (which local files are which logged model, and their deletion),
``description`` (what a save's manifest says) and ``resume`` (:func:`checkpoint_path`).
"""

from __future__ import annotations

from tracking.integrations.lightning.callback import MLflowCheckpoints
from tracking.integrations.lightning.description import FORMAT
from tracking.integrations.lightning.kept import TAG_PATHS
from tracking.integrations.lightning.resume import RESUME_LINE, checkpoint_path

__all__ = ["FORMAT", "RESUME_LINE", "TAG_PATHS", "MLflowCheckpoints", "checkpoint_path"]
