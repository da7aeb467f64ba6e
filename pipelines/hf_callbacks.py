"""The Trainer callbacks :mod:`pipelines.hf_digits` adds to the integration's: metrics of the epochs without a
checkpoint, and what a resume needs the Trainer to do otherwise than it would (the run's learning rate, the
given save interval, evaluations that leave the RNG states alone)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def epoch_metrics() -> Any:
    """A callback logging the metrics of the epochs that get no checkpoint (a checkpoint logs its own)."""
    import mlflow
    from transformers import TrainerCallback

    from tracking.integrations.transformers import checkpoint_metrics

    class EpochMetrics(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any) -> None:
            # Logged before the epoch's save: should_save says whether a checkpoint will carry these.
            # At the global step, where TrackingCallback charts a checkpoint's: one chart, one x axis.
            metrics = checkpoint_metrics([logs or {}], state.global_step)
            # Under torchrun every rank logs; rank 0 alone has the run.
            if metrics and not control.should_save and state.is_world_process_zero:
                mlflow.log_metrics(metrics, step=state.global_step)

    return EpochMetrics()


def learning_rate(lr: float) -> Any:
    """A callback that puts ``lr``, the run's learning rate, into the optimizer and the scheduler the Trainer
    restored from the resumed folder, before the first step, where they hold another
    (:func:`pipelines.resume.apply_lr`)."""
    from transformers import TrainerCallback

    from pipelines import resume

    class LearningRate(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(
            self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None, **kw: Any
        ) -> None:
            scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper, if any
            resume.apply_lr(optimizer, scheduler, lr)

    return LearningRate()


def given_intervals() -> Any:
    """A callback that makes a resumed training save, evaluate and log every --checkpoint-every-steps steps.

    The Trainer takes save_steps, eval_steps and logging_steps from the resumed folder's trainer_state.json,
    not from its arguments: a run resumed with --override --checkpoint-every-steps would record the new
    interval and save by the old one.
    """
    from transformers import TrainerCallback

    class GivenIntervals(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            state.compute_steps(args, state.max_steps)

    return GivenIntervals()


def neutral_evaluations() -> Any:
    """A callback that puts the RNG states back as they were before each evaluation of a training by steps.

    Evaluating draws from the global RNG (each DataLoader iterator draws its base seed), and the Trainer
    evaluates at its last step also when that step is no multiple of --checkpoint-every-steps; the save
    there holds the RNG states after that evaluation, which a longer run never made. Left neutral, a
    resume from that save goes on as the longer run does, bit for bit.
    """
    from transformers import TrainerCallback

    import tracking

    class NeutralEvaluations(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.before: dict[str, Any] | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # After the Trainer's own flow callback decided: an evaluation follows this step.
            self.before = tracking.capture_rng_state() if control.should_evaluate else None

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.before is not None:  # before the save of this step writes the RNG states
                tracking.restore_rng_state(self.before)
                self.before = None

    return NeutralEvaluations()
