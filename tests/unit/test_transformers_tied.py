"""A Trainer's model with tied weights (a GPT-2 LM head that is its input embedding): ``save_pretrained`` stores the
shared tensor once, and the logged checkpoint still loads back equal, rebuilt by ``from_pretrained`` or into a model
given to ``tracking.load``."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import tracking
from tracking.integrations.transformers import TrackingCallback


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random sequences of a 32-token vocabulary, each its own label (causal language modelling)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def test_a_tied_models_checkpoint_loads_back_equal_into_a_model_given_or_rebuilt(
    s3_experiment: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    args = TrainingArguments(
        str(tmp_path / "out"),
        num_train_epochs=1,
        per_device_train_batch_size=16,
        save_strategy="epoch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    with mlflow.start_run() as run:
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[TrackingCallback()]).train()
    run_id = run.info.run_id
    # The shared tensor is stored once: the head's copy is left out of the weights.
    assert "lm_head.weight" not in tracking.load_state_dict(run_id)
    trained = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for loaded in (tracking.load(run_id).model, tracking.load(run_id, model=tiny_gpt2(), mode="train").model):
        assert loaded.state_dict().keys() == trained.keys()
        for key, value in trained.items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
