"""The Trainer's saves the callback logs: the save strategies it takes and the key each gives the run's checkpoints,
the epochs ``every_n_epochs`` keeps, and whether each save carries the metric that ranks it."""

from __future__ import annotations

import math

from transformers import TrainerControl, TrainerState, TrainingArguments

from tracking import layout

# The Trainer's save strategies the callback logs, and what each keys the run's checkpoints by: a save at
# each epoch's end by its epoch, a save every save_steps (and at the last step) by its global step.
KEYED_BY = {"epoch": layout.EPOCH, "steps": layout.STEP}


class SaveSchedule:
    """Which of the Trainer's saves are made: with ``save_strategy="epoch"``, every ``every_n_epochs``-th epoch's
    and the last (the schedule's, or where a callback stops training); by steps, each one ``save_steps`` makes."""

    def __init__(self, every_n_epochs: int) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.keyed_by = layout.EPOCH
        # The Trainer's best (metric, global step, folder) before the evaluation of an epoch whose save is skipped.
        self._best_before_skip: tuple[float | None, int | None, str | None] | None = None

    def start(self, args: TrainingArguments) -> None:
        """Take the save strategy of the ``train()`` that starts (other strategies are refused)."""
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy not in KEYED_BY:
            raise ValueError(
                f"TrackingCallback logs the checkpoints of TrainingArguments(save_strategy='steps') or 'epoch', "
                f"got save_strategy={strategy!r}; set save_strategy='steps' with save_steps=N (keep the best with "
                "metric_for_best_model and save_total_limit) or save_strategy='epoch'."
            )
        if strategy != "epoch" and self.every_n_epochs != 1:
            raise ValueError(
                f"TrackingCallback(every_n_epochs={self.every_n_epochs}) thins the saves of save_strategy='epoch', "
                f"got save_strategy={strategy!r}; set save_steps=N to save less often, or save_strategy='epoch'."
            )
        self.keyed_by = KEYED_BY[strategy]

    def epoch_ended(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Cancel the save of an epoch that is not due."""
        # The Trainer saves every epoch; between due epochs it saves nothing, so its folders and
        # the run's logged models stay one to one. Saves by steps are thinned by save_steps alone.
        if self.keyed_by != layout.EPOCH:
            return
        epoch = epochs_completed(state, layout.EPOCH)
        # With max_steps the Trainer ignores num_train_epochs (3 by default): its last epoch is the one max_steps ends.
        # A callback that stopped training here (before this one: it goes last) makes this epoch the last too.
        last = (
            control.should_training_stop
            or state.global_step >= state.max_steps
            or (args.max_steps <= 0 and epoch >= math.ceil(args.num_train_epochs))
        )
        if control.should_save and not last and epoch % self.every_n_epochs != 0:
            control.should_save = False
            # The Trainer ranks this epoch's evaluation next, saved or not: an unsaved epoch taken for its best would
            # make no later save its best (load_best_model_at_end would load none, save_total_limit would delete the
            # best saved). Its best as it stands is put back as the next epoch begins: the best of the saves.
            self._best_before_skip = (state.best_metric, state.best_global_step, state.best_model_checkpoint)

    def epoch_began(self, state: TrainerState) -> None:
        """Put back the Trainer's best as it stood before the evaluation of an epoch left unsaved."""
        if self._best_before_skip is not None:
            state.best_metric, state.best_global_step, state.best_model_checkpoint = self._best_before_skip
            self._best_before_skip = None

    def evaluated(self, control: TrainerControl) -> None:
        """Save, after all, an epoch left unsaved whose evaluation stops training."""
        if self._best_before_skip is not None and control.should_training_stop:
            # Stopped early at an epoch the schedule skips (EarlyStoppingCallback, which ran before this one): saved
            # after all, as the last, so that the run resumes from where training stopped. The Trainer may rank it.
            control.should_save = True
            self._best_before_skip = None


def epochs_completed(state: TrainerState, keyed_by: str) -> int:
    """The epoch of a save keyed by epoch: the one it ends, or the one under way when training stopped mid-epoch
    (max_steps, should_training_stop), which must not replace the save of the epoch before. A save by steps
    may come mid-epoch: the epochs completed, which the Trainer skips when it resumes from that folder."""
    # The Trainer's epoch is a float (2.0 at the second epoch's end, 1.25 two steps into it of eight);
    # rounded first, so that a sum's last bits never put an epoch's end into the next.
    epoch = round(state.epoch or 0.0, 6)
    return math.ceil(epoch) if keyed_by == layout.EPOCH else math.floor(epoch)


def unevaluated_saves(args: TrainingArguments, state: TrainerState) -> str | None:
    """Why the Trainer's saves will not all carry the eval metric that ranks them (``metric_for_best_model``) and
    what follows, said for a warning; None when no metric ranks them or each save falls on an evaluation.

    Each save falls on an evaluation under the Trainer's own rule for ``load_best_model_at_end``: one strategy
    for both and, by steps, ``save_steps`` a multiple of ``eval_steps`` (``state``'s, ratios made steps).
    """
    if not args.metric_for_best_model:
        return None
    evaluate = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    save = str(getattr(args.save_strategy, "value", args.save_strategy))
    no_best = "no checkpoint will carry eval metrics, so the run will have no best checkpoint (checkpoint='best' fails)"
    if evaluate == "no":
        return f"the Trainer never evaluates (eval_strategy='no'): {no_best}"
    if (evaluate, save) == ("epoch", "steps"):
        # The last save of an epoch is made at its last step, before the epoch's evaluation, never after it.
        return f"the Trainer saves by steps, each before the epoch's evaluation (eval_strategy='epoch'): {no_best}"
    if evaluate == save and (save == "epoch" or (state.eval_steps and state.save_steps % state.eval_steps == 0)):
        return None
    saving = f"every {state.save_steps} steps" if save == "steps" else "at each epoch's end"
    return (
        f"the Trainer evaluates every {state.eval_steps} steps and saves {saving}: only the saves that fall on "
        "an evaluation will carry eval metrics, so the run's best checkpoint is picked among those alone, if any"
    )
