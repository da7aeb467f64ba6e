"""The LightningModules the Lightning pipeline trains (a module of their own: importing the pipeline's
command line does not import Lightning)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipelines import data

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


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The digits' training (shuffled) and validation loaders, as the pipeline trains on them."""
    split = data.load("digits")
    train = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=batch_size, shuffle=True)
    return train, DataLoader(TensorDataset(split.x_val, split.y_val), batch_size=256)
