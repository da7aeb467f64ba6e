"""The run's description fits MLflow's limit with any number of checkpoints, and keeps its "load it" lines."""

from __future__ import annotations

import re

import mlflow
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tracking import note

RUN_ID = "0123456789abcdef0123456789abcdef"


def noted(epochs: range) -> dict[int, note.NotedCheckpoint]:
    metrics = ("val_loss", "train_loss", "accuracy", "learning_rate", "grad_norm")
    return {
        epoch: note.NotedCheckpoint(f"m-{epoch:032x}", {name: 1.0 / epoch + i for i, name in enumerate(metrics)})
        for epoch in epochs
    }


def render(checkpoints: dict[int, note.NotedCheckpoint], latest: int, best: int) -> str:
    return note.render(
        RUN_ID,
        model_class="pipelines.models:DigitsMLP",
        optimizer_class="torch.optim.sgd:SGD",
        checkpoints=checkpoints,
        latest=latest,
        best=best,
        monitor="val_loss",
        commands=[f"python -m pipelines.evaluate --run-id {RUN_ID}", f"python -m pipelines.train --resume {RUN_ID}"],
    )


def table_epochs(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^\| (\d+) \| `m-", text, flags=re.MULTILINE)]


def test_130_checkpoints_summarise_the_table_and_keep_every_load_line() -> None:
    text = render(noted(range(1, 131)), latest=130, best=7)
    assert len(text) <= note.MAX_CHARS
    small = render(noted(range(1, 3)), latest=2, best=1)
    load_it = small[small.index("**Load it**") :].replace(f"m-{2:032x}", f"m-{130:032x}")
    load_it = load_it.replace("epoch 2", "epoch 130")
    assert text.endswith(load_it)
    shown = table_epochs(text)
    assert shown[:1] == [130] and 7 in shown and shown == sorted(shown, reverse=True)
    left_out = f"*{130 - len(shown)} more checkpoints are not shown: `tracking checkpoints {RUN_ID}` lists them all.*"
    assert f"\n\n{left_out}\n\n**Load it**" in text
    assert len(shown) > 20  # summarised, not emptied


def test_a_few_checkpoints_are_all_listed() -> None:
    text = render(noted(range(1, 6)), latest=5, best=1)
    assert table_epochs(text) == [5, 4, 3, 2, 1]
    assert "not shown" not in text


def test_the_stored_description_of_a_run_is_the_whole_rendering(experiment: str) -> None:
    # Long commands leave room for few rows: what MLflow stores still ends with the load lines.
    commands = [f"python -m pipelines.evaluate --run-id {{run_id}} --note {'x' * 1690}"] * 4
    with mlflow.start_run() as run, tracking.Checkpointer(monitor="val_loss", commands=commands) as checkpointer:
        for epoch in range(1, 6):
            checkpointer.save(Model(6), epoch=epoch, metrics={"val_loss": 1.0 / epoch, "loss": 2.0})
    stored = MlflowClient().get_run(run.info.run_id).data.tags[note.NOTE_TAG]
    assert len(stored) <= note.MAX_CHARS
    assert stored.endswith("```") and f"--run-id {run.info.run_id}" in stored.splitlines()[-2]
    assert 5 in table_epochs(stored) and "more checkpoints are not shown" in stored


def test_relisting_gives_what_render_writes_for_the_checkpoints_that_remain() -> None:
    every = noted(range(1, 131))  # summarised: the table ends with the line saying how many are left out
    remaining = {epoch: every[epoch] for epoch in (7, 130)}
    tags = {"tracking.checkpoint.latest": every[130].model_id, "tracking.checkpoint.best": every[7].model_id}
    relisted = note.relist(
        render(every, latest=130, best=7), RUN_ID, remaining, tags, monitor="val_loss", keyed_by="epoch"
    )
    assert relisted == render(remaining, latest=130, best=7)
    assert note.relist(relisted, RUN_ID, remaining, tags, monitor="val_loss", keyed_by="epoch") == relisted


def test_a_description_a_user_wrote_or_edited_around_the_table_is_not_relisted() -> None:
    ours = render(noted(range(1, 4)), latest=3, best=1)
    edited = ours.replace("**Load it**", "Epoch 1 diverged, see the notebook.\n\n**Load it**")
    for text in ("Baseline for the ablation.", "", edited, ours.replace("Training run of", "Run of")):
        assert note.relist(text, RUN_ID, noted(range(3, 4)), {}, monitor="val_loss", keyed_by="epoch") is None
