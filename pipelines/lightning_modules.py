"""What the Lightning pipeline trains with: its LightningModule, its data (a loader Lightning resumes
mid-epoch) and its ModelCheckpoint (a module of their own: importing the pipeline's command line does not
import Lightning)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from pipelines import data, resume

STEP_SIZE, GAMMA = 3, 0.5  # the learning rate halves every 3 epochs


class LitDigits(pl.LightningModule):
    """An MLP (dropout) over the digits' 64 pixels; Adam with a StepLR schedule."""

    def __init__(self, n_features: int = 64, hidden: int = 128, dropout: float = 0.2, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        outputs = self(x)
        loss = F.cross_entropy(outputs, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_accuracy", (outputs.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        outputs = self(x)
        self.log("val_loss", F.cross_entropy(outputs, y))
        self.log("val_accuracy", (outputs.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=GAMMA)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class EpochShuffle(Sampler[int]):
    """The training rows in an order drawn from the seed and the epoch (Lightning calls ``set_epoch``), so a
    resumed fit draws the order a fit that never stopped drew; an epoch resumed mid-way skips its first
    ``start`` rows."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.start, self.taken = size, seed, 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        # hash() of a tuple of ints is the same in every process (PYTHONHASHSEED salts only str and bytes).
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(hash((self.seed, self.epoch))))
        self.taken, self.start = self.start, 0
        for index in order[self.taken :].tolist():
            self.taken += 1
            yield index


class ResumableLoader(DataLoader[Any]):
    """A DataLoader with ``state_dict``/``load_state_dict``: Lightning keeps its place in each checkpoint and
    resumes a mid-epoch one at its next batch (a plain DataLoader would start that epoch's data over)."""

    sampler: EpochShuffle

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.sampler.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A save at an epoch's end: the next epoch starts at its beginning.
        self.sampler.start = state["taken"] % len(self.sampler)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The digits' training loader (shuffled by ``seed`` and the epoch, resumable mid-epoch) and validation
    loader, as the pipeline trains on them."""
    split = data.load("digits")
    rows = TensorDataset(split.x_train, split.y_train)
    train = ResumableLoader(rows, batch_size=batch_size, sampler=EpochShuffle(len(rows), seed))
    return train, DataLoader(TensorDataset(split.x_val, split.y_val), batch_size=256)


class PipelineCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` saving every ``every_n_epochs`` epochs or every ``every_n_train_steps`` optimizer
    steps, and at the end of the last epoch (``max_epochs``), so that a run's latest checkpoint is where it stopped.

    A save by steps that falls on an epoch's last batch is made at that epoch's end instead, after its
    validation, where saves by epoch are made: Lightning resumes a save made before that validation past
    the epoch's end without running it, and the run would not go on as one that never stopped.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # on_train_epoch_end saves it, if due
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores a ModelCheckpoint's state (the files it keeps) under a key that names its interval
        # too: a resume with another --checkpoint-every(-steps) (--override) takes over the state kept under
        # the one the run had, so that --keep-last goes on removing the earlier files (and their models).
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = type(self).__qualname__
        for key, state in list(states.items()):
            if not (isinstance(key, str) and key.startswith(prefix + "{")):
                continue
            try:
                fields = ast.literal_eval(key[len(prefix) :])
            except (ValueError, SyntaxError):  # a train_time_interval's timedelta: not one of the pipeline's
                continue
            if isinstance(fields, dict) and (fields.get("monitor"), fields.get("mode")) == (self.monitor, self.mode):
                states[self.state_key] = state
                return

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # a save every N epochs
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if (due or last) and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class RebatchedEpoch(pl.Callback):
    """Counts the batches a save in mid-epoch had taken as ``batches`` of the size the resumed fit trains with (an
    ``--override``-n ``--batch-size``; :func:`pipelines.resume.resumed_position` made sure they are whole): the
    loader skips the samples taken whatever their batches, but Lightning restores its count of the epoch's batches,
    which says when the epoch validates, steps its scheduler and ends, from the checkpoint's."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called before Lightning restores its loops from the same dict. Every counter moves alike: the batch the
        # save was made in is ready, started and processed, and completes once the fit resumes.
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        shift = self.batches - progress["current"]["ready"]
        for counters in (progress["current"], progress["total"]):
            for name in counters:
                counters[name] += shift


class GivenLearningRate(pl.Callback):
    """Puts ``lr``, the run's learning rate (an ``--override``-n one, or its override tag's), into the optimizer and
    the scheduler a resumed fit restored from its checkpoint, before its first step, where they hold another
    (:func:`pipelines.resume.apply_lr`)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedulers = {id(config.scheduler.optimizer): config.scheduler for config in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            resume.apply_lr(optimizer, schedulers.get(id(optimizer)), self.lr)
