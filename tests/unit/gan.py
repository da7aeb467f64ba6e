"""A GAN-like model trained by two optimizers (the generator's, the discriminator's), each with its scheduler:
what tests of several optimizers in one checkpoint train, here and in a fresh process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import tracking


@tracking.rebuildable
class GAN(nn.Module):
    def __init__(self, noise: int = 4, width: int = 8) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(noise, width), nn.ReLU(), nn.Linear(width, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 1))
        self.noise = noise


def setup(
    seed: int = 0, shard: Callable[[GAN], None] | None = None
) -> tuple[GAN, dict[str, torch.optim.Optimizer], dict[str, Any]]:
    """The model, its two Adams by name (other learning rates, so that mixing them up shows) and their schedulers;
    ``shard`` prepares the model (FSDP2) before the optimizers take its parameters."""
    torch.manual_seed(seed)
    model = GAN()
    if shard is not None:
        shard(model)
    optimizers: dict[str, torch.optim.Optimizer] = {
        "generator": torch.optim.Adam(model.generator.parameters(), lr=1e-2, betas=(0.5, 0.999)),
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=3e-3),
    }
    schedulers = {
        "generator": torch.optim.lr_scheduler.StepLR(optimizers["generator"], step_size=2, gamma=0.5),
        "discriminator": torch.optim.lr_scheduler.ExponentialLR(optimizers["discriminator"], gamma=0.9),
    }
    return model, optimizers, schedulers


def train(model: GAN, optimizers: dict[str, Any], schedulers: dict[str, Any] | None, steps: int, seed: int) -> None:
    """``steps`` alternating steps: the discriminator's on real and generated samples, then the generator's."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        real = torch.randn(8, 6, generator=generator) + 2
        fake = model.generator(torch.randn(8, model.noise, generator=generator))
        bce = nn.functional.binary_cross_entropy_with_logits
        loss = bce(model.discriminator(real), torch.ones(8, 1)) + bce(
            model.discriminator(fake.detach()), torch.zeros(8, 1)
        )
        optimizers["discriminator"].zero_grad()
        loss.backward()
        optimizers["discriminator"].step()
        loss = bce(model.discriminator(fake), torch.ones(8, 1))
        optimizers["generator"].zero_grad()
        loss.backward()
        optimizers["generator"].step()
        for scheduler in (schedulers or {}).values():
            scheduler.step()
