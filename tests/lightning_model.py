"""A tiny LightningModule, its data and a fit with the integration's callback, for the Lightning integration's
tests on the CPU (tests/unit) and on CUDA (tests/gpu): dropout and a shuffling loader, so that an exact resume
has to restore the RNG states too; and a shuffling loader Lightning can resume mid-epoch. ``TwoOptimizerLit`` is
a GAN-like module of two optimizers (manual optimization)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from tracking.integrations.lightning import MLflowCheckpoints


class TinyLit(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Dropout(0.2), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}


class TwoOptimizerLit(pl.LightningModule):
    """A generator and a discriminator, each trained by its own optimizer of its own class (manual optimization),
    each with its LR scheduler; the schedulers come in the other order than their optimizers, so that a scheduler's
    place in Lightning's list is not its optimizer's. ``lambda_lr``: the generator's scheduler is a LambdaLR, whose
    init arguments (a function) cannot be recorded."""

    def __init__(self, lr: float = 0.01, lambda_lr: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        generator, discriminator = self.optimizers()  # type: ignore[misc]
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        fake = self.generator(torch.randn_like(real))
        loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        discriminator.zero_grad()
        self.manual_backward(loss)
        discriminator.step()
        self.log("d_loss", loss, on_epoch=True, on_step=False)
        generator.zero_grad()
        self.manual_backward(bce(self.discriminator(fake), ones))
        generator.step()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.discriminator(batch[0]).mean())

    def on_train_epoch_end(self) -> None:
        for scheduler in self.lr_schedulers():  # type: ignore[union-attr]
            scheduler.step()

    def configure_optimizers(self) -> Any:
        generator = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=(0.5, 0.999))
        discriminator = torch.optim.SGD(self.discriminator.parameters(), lr=self.hparams.lr / 2, momentum=0.9)
        schedulers = [
            torch.optim.lr_scheduler.ExponentialLR(discriminator, gamma=0.9),
            halving(generator) if self.hparams.lambda_lr else torch.optim.lr_scheduler.StepLR(generator, 1, 0.5),
        ]
        return [generator, discriminator], schedulers


def halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that halves the learning rate every epoch, from a function: one that cannot be described."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)


class EpochShuffle(Sampler[int]):
    """Each epoch's own order (a function of the epoch Lightning sets), resumable after its first ``start`` indices."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch, self.start, self.taken = size, 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        self.taken, self.start = self.start, 0
        for index in order[self.taken :]:
            self.taken += 1
            yield index


class ResumableLoader(DataLoader[Any]):
    """A DataLoader with ``state_dict``/``load_state_dict``: Lightning keeps its place in the checkpoint and
    resumes a mid-epoch checkpoint at the next batch (a plain DataLoader starts its epoch over)."""

    sampler: EpochShuffle

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.sampler.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A save at an epoch's last batch: the next epoch starts at its beginning.
        self.sampler.start = state["taken"] % len(self.sampler)


def loaders(resumable: bool = False) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The training loader (shuffling; ``resumable``: a :class:`ResumableLoader`) and the validation loader."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    dataset = TensorDataset(x, y)
    train = (
        ResumableLoader(dataset, batch_size=16, sampler=EpochShuffle(len(dataset)))
        if resumable
        else DataLoader(dataset, batch_size=16, shuffle=True)
    )
    return train, DataLoader(dataset, batch_size=32)


def trainer(epochs: int, folder: Path, callbacks: list[Any], *, accelerator: str = "cpu", **kwargs: Any) -> pl.Trainer:
    """A quiet Trainer on one device (the CPU unless ``accelerator="gpu"``), deterministic, checkpointing into
    ``folder``, with no sanity check unless ``num_sanity_val_steps`` is given."""
    kwargs.setdefault("num_sanity_val_steps", 0)
    return pl.Trainer(
        max_epochs=epochs,
        default_root_dir=str(folder),
        callbacks=callbacks,
        logger=kwargs.pop("logger", False),
        accelerator=accelerator,
        devices=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def fit(
    epochs: int,
    folder: Path,
    *,
    ckpt_path: str | None = None,
    logger: Any = False,
    accelerator: str = "cpu",
    max_steps: int = -1,
    resumable: bool = False,
    module: Callable[[], pl.LightningModule] = TinyLit,
    **checkpoint: Any,
) -> tuple[Any, pl.Trainer]:
    """A seeded ``TinyLit`` (or ``module()``) fitted ``epochs`` epochs, or ``max_steps`` steps (from ``ckpt_path``
    when given), its ``ModelCheckpoint`` (``checkpoint`` its arguments) in ``folder / "checkpoints"`` mirrored by
    ``MLflowCheckpoints``; ``resumable``: on the :class:`ResumableLoader`."""
    pl.seed_everything(0, verbose=False)
    model = module()
    checkpoints = ModelCheckpoint(dirpath=folder / "checkpoints", **checkpoint)
    fitted = trainer(
        epochs,
        folder,
        [checkpoints, MLflowCheckpoints()],
        accelerator=accelerator,
        logger=logger,
        max_steps=max_steps,
    )
    fitted.fit(model, *loaders(resumable), ckpt_path=ckpt_path)
    return model, fitted
