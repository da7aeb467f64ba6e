"""The training loop the pipelines share, and their command line entry point.

A pipeline describes its :class:`~pipelines.task.Task` and hands its command line to
:func:`main`. Every epoch logs ``train_loss``, ``train_accuracy``, ``val_loss``,
``val_accuracy`` and ``lr`` at ``step=epoch`` (epochs count from 1) and offers a
checkpoint to a :class:`tracking.Checkpointer`; the last epoch always gets one. An epoch
that gets a checkpoint logs its metrics through it (to the run and to the checkpoint's
logged model, at the same step), so the charts and the checkpoints agree.

``--checkpoint-every-steps N`` (recorded; instead of ``--checkpoint-every``) saves every N
optimizer steps instead, keyed by global step, and charts by global step: a save in
mid-epoch validates there, and keeps where its epoch stood (:mod:`pipelines.steps`).

``--resume RUN_ID [--from-epoch N | --from-step N]`` restores the model, optimizer, scheduler,
global step and every RNG state (torch, CUDA, numpy, Python and the DataLoader's sampler),
so the epochs after it draw the same batches (a save in mid-epoch: the rest of its epoch's)
and reach the same weights bit for bit as a run that never stopped (on a GPU too:
:func:`~pipelines.task.seed_everything` picks deterministic kernels there). Which run a resume
goes on in, and what it refuses, is :mod:`pipelines.runs`; the epoch loop itself is :mod:`pipelines.epochs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pipelines import options
from pipelines.epochs import AfterStep, run_epochs
from pipelines.steps import KEY, Position, SkippingBatches
from pipelines.task import State, Task, seed_everything

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from pipelines import data

# torch, MLflow, scikit-learn and rich are imported inside the functions that train, after the
# command line is parsed: `--help` and a usage error answer in a fraction of a second, not 5 s.


def main(task: Task, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Run a pipeline from its command line; errors print one line to stderr and return 1."""
    opts = options.parse(
        argv, prog=f"python -m {task.name}", description=description, defaults=task.defaults, steps=True
    )

    def run() -> str:
        from pipelines import parallel

        if opts.strategy is not None or parallel.launched():
            return parallel.train(task, replace(opts, strategy=opts.strategy or "ddp"))
        return train(task, opts)

    return options.run_pipeline(run)


def train(task: Task, opts: options.Options) -> str:
    """Train a new run, or resume one, as ``opts`` says; returns the run ID."""
    import torch
    from mlflow.tracking import MlflowClient
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    import tracking
    from pipelines import data, override, reporting, resume, runs

    config = tracking.TrackingConfig.from_env(experiment_name=opts.experiment)
    client = MlflowClient(config.tracking_uri)
    opts = resume.pinned(opts, config)
    origin = resume.find_origin(client, task, opts, config) if opts.resume else None
    opts = resume.with_target(opts, origin)
    values = opts.settings(override.current_params(origin), origin.info.run_id if origin else None)
    overrides = runs.changed_params(task, opts, origin) if origin else {}
    if origin is not None and not opts.new_run:
        resume.check_keys(origin.info.run_id, values, config, instead="add --new-run to branch a child run")
    split = data.load(task.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(values["seed"])
    generator = torch.Generator().manual_seed(values["seed"])
    position = None
    if origin:
        state, rng, position = resume.restore(task, opts, origin, values, overrides, split, device)
    else:
        state, rng = _build(task, values, split, device), None
    dataset = TensorDataset(split.x_train, split.y_train)
    # What DataLoader(shuffle=True, generator=generator) builds, the same draws from the generator, able to
    # begin the epoch a save in mid-epoch left past the batches it had taken.
    batches = SkippingBatches(BatchSampler(RandomSampler(dataset, generator=generator), values["batch_size"], False))
    loader = DataLoader(dataset, batch_sampler=batches, generator=generator)
    x_val, y_val = split.x_val.to(device), split.y_val.to(device)
    checkpoints = runs.checkpointer(values, f"python -m {task.name} --resume {{run_id}} --epochs {2 * opts.epochs}")
    # The sampler's state as the epoch under way began: a save in mid-epoch keeps it, to draw that order again.
    epoch_start = torch.Generator()

    def train_epoch(epoch: int, start: Position | None, after_step: AfterStep) -> tuple[float, float]:
        epoch_start.set_state(generator.get_state())
        batches.skip = start.batches if start else 0
        return _train_epoch(task, state, loader, device, start, after_step)

    def carried(epoch: int, position: Position | None) -> dict[str, Any]:
        if position is None:  # an epoch's end: the sampler as the next epoch begins
            return {"extra": {"rng": tracking.capture_rng_state({"sampler": generator})}}
        rng = tracking.capture_rng_state({"sampler": epoch_start})
        return {"extra": {"rng": rng, KEY: position.saved(values["batch_size"])}}

    with runs.start(client, config, task, opts, origin, values, overrides, state) as run, checkpoints:
        reporting.announce(client, run)
        if rng is not None and "seed" not in overrides:
            # Last thing before the loop, so nothing above (MLflow names new runs with `random`) shifts it.
            # An --override-n seed draws the batches (and dropout) from here on instead.
            tracking.restore_rng_state(rng, {"sampler": generator})
        run_epochs(task, state, opts.epochs, checkpoints, train_epoch, (x_val, y_val), carried, resumed=position)
        # The trained model in the two other shapes the save/load notes use: its state dict, and
        # the whole model in MLflow's pytorch flavor (mlflow.pytorch.load_model, model serving).
        by_step = checkpoints.every_n_steps is not None  # charted by global step
        whole = runs.log_final_weights(state.model, opts.epochs, state.step if by_step else None)
        reporting.report(client, run, whole.model_id)
        return str(run.info.run_id)


def _train_epoch(
    task: Task,
    state: State,
    loader: DataLoader[Any],
    device: torch.device,
    start: Position | None,
    after_step: AfterStep,
) -> tuple[float, float]:
    import torch

    state.model.train()
    if start is None:
        # Summed on the device, read once per epoch: .item() per batch would sync a GPU every step.
        sums: dict[str, Any] = {
            "loss": torch.zeros((), device=device),
            "correct": torch.zeros((), device=device, dtype=torch.int64),
            "seen": 0,
        }
        taken = 0
    else:  # the sums of the batches the save in mid-epoch had taken
        sums = {name: value.to(device) if hasattr(value, "to") else value for name, value in start.sums.items()}
        taken = start.batches
    last = len(loader)

    def so_far() -> tuple[float, float]:
        return sums["loss"].item() / sums["seen"], sums["correct"].item() / sums["seen"]

    for x, y in loader:
        x, y = x.to(device), y.to(device)
        state.optimizer.zero_grad()
        outputs = state.model(x)
        loss = task.loss(outputs, y)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        taken += 1
        sums["loss"] += loss.detach() * len(y)
        sums["correct"] += (task.predict(outputs) == y).sum()
        sums["seen"] += len(y)
        after_step(Position(taken, sums), so_far, taken == last)
    if state.scheduler is not None:
        state.scheduler.step()
    return so_far()


def _build(task: Task, values: Mapping[str, Any], split: data.Split, device: torch.device) -> State:
    model = task.build_model(split.n_features).to(device)
    optimizer = task.build_optimizer(model.parameters(), values["lr"])
    scheduler = task.build_scheduler(optimizer) if task.build_scheduler else None
    return State(model, optimizer, scheduler)
