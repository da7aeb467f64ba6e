"""A tiny Hugging Face model, built from a config made in code (nothing comes from a model hub), and its data.

``DigitsClassifier`` is a ``PreTrainedModel``: the Trainer saves it as ``config.json`` +
``model.safetensors``, and ``DigitsClassifier.from_pretrained(folder)`` rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class DigitsConfig(PretrainedConfig):  # type: ignore[misc]
    model_type = "tracking-digits-mlp"

    def __init__(
        self, n_features: int = 64, hidden: int = 32, n_classes: int = 10, dropout: float = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.n_features = n_features
        self.hidden = hidden
        self.n_classes = n_classes
        self.dropout = dropout


class DigitsClassifier(PreTrainedModel):  # type: ignore[misc]
    """An MLP over 8x8 digit images; dropout makes train and eval mode differ."""

    config_class = DigitsConfig
    base_model_prefix = "digits"

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(config.n_features, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.n_classes),
        )
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Examples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Feature rows and labels as the Trainer feeds them to ``forward``: ``{"x": ..., "labels": ...}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


def digits() -> tuple[Examples, Examples]:
    """scikit-learn's 8x8 digits (:func:`pipelines.data.load`'s split) as the Trainer's training and evaluation sets."""
    from pipelines import data

    split = data.load("digits")
    return Examples(split.x_train, split.y_train), Examples(split.x_val, split.y_val)


def accuracy(prediction: Any) -> dict[str, float]:
    """The Trainer's ``compute_metrics``: the share of validation rows classified right (``eval_accuracy``)."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(axis=-1) == labels).mean())}
