"""The Hugging Face Trainer: every checkpoint folder it saves becomes a checkpoint logged model of the run.

::

    from tracking.integrations.transformers import TrackingCallback, checkpoint_folder

    trainer = Trainer(model, args, ..., callbacks=[TrackingCallback()])  # save_strategy "steps" or "epoch"
    trainer.train()
    # later, in the same run: resume exactly where the run's latest checkpoint stopped
    trainer.train(resume_from_checkpoint=checkpoint_folder(run_id, output_dir=args.output_dir))

Each save of the Trainer (``<output_dir>/checkpoint-<step>``: ``model.safetensors``,
``config.json``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` (under DDP one
``rng_state_<rank>.pth`` per rank), ``trainer_state.json``, ...) is committed as one logged model:
every file with its sha256, the manifest last (format ``"transformers"``), READY, the run's
latest/best tags. A save of ``save_strategy="steps"`` is keyed by its global step
(``checkpoint-step-00001500``), one of ``save_strategy="epoch"`` by its epoch
(``checkpoint-epoch-0003``). The Trainer's own rotation (``save_total_limit``, keeping the best
checkpoint of ``metric_for_best_model``) is mirrored: a logged model whose folder the Trainer
deleted is deleted too. The upload runs in the background: the training loop waits only while the folder's files are
linked into a private staging folder.

Its modules: ``callback`` (:class:`TrackingCallback`), ``staging`` (a save's files, linked aside for
their upload), ``rotation`` (the Trainer's rotation, mirrored on the run), ``description`` (what a
save's manifest says), ``folders`` (the folders' name, and :func:`checkpoint_folder`) and ``reporting``
(the Trainer's own MLflow logging, kept from ending runs it did not start).
"""

from __future__ import annotations

from tracking.integrations.transformers.callback import TrackingCallback
from tracking.integrations.transformers.description import FORMAT, checkpoint_metrics
from tracking.integrations.transformers.folders import PREFIX, checkpoint_folder
from tracking.integrations.transformers.staging import STAGING

__all__ = ["FORMAT", "PREFIX", "STAGING", "TrackingCallback", "checkpoint_folder", "checkpoint_metrics"]
