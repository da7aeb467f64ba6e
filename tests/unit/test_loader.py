"""Loading: run ID -> rebuilt model and optimizer, integrity and safety checks, clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import boto3
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import tracking
from pipelines.models import DigitsMLP, Model
from tests.unit.conftest import BUCKET
from tracking import layout, optimizers
from tracking.parallel import distributed
from tracking.run import open_run
from tracking.selection import find_checkpoint

REPO = Path(__file__).resolve().parents[2]


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> None:
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()


def digits_setup(seed: int = 0) -> tuple[DigitsMLP, torch.optim.Adam, Any]:
    torch.manual_seed(seed)
    model = DigitsMLP(hidden=32, dropout=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


# ------------------------------------------------------------ fresh process


CHILD = textwrap.dedent(
    """
    import sys, torch, tracking
    import pipelines.models  # the model's code: the loader never imports a module a manifest names
    run_id, out = sys.argv[1], sys.argv[2]
    loaded = tracking.load(run_id)                      # eval mode by default
    x = torch.load(out + ".x", weights_only=True)
    result = {"eval_out": loaded.model(x), "training": loaded.model.training}
    loaded.model.train()
    torch.manual_seed(123)
    batch, target = torch.randn(16, 64), torch.randint(0, 10, (16,))
    loaded.optimizer.zero_grad()
    torch.nn.functional.cross_entropy(loaded.model(batch), target).backward()
    loaded.optimizer.step()
    loaded.scheduler.step()
    result.update(
        epoch=loaded.epoch, step=loaded.step, params=loaded.model.state_dict(),
        optim=loaded.optimizer.state_dict(), lr=loaded.optimizer.param_groups[0]["lr"],
    )
    torch.save(result, out)
    """
)


@pytest.mark.parametrize("artifacts", ["s3", "file"])
def test_fresh_process_rebuilds_model_optimizer_and_scheduler_exactly(
    artifacts: str, request: pytest.FixtureRequest, tracking_store: str, tmp_path: Path
) -> None:
    if artifacts == "s3":
        request.getfixturevalue("tracking_s3_server")  # moto over HTTP: the child reaches it
        location = f"s3://{BUCKET}/exp"
    else:
        location = (tmp_path / "artifacts").as_uri()
    experiment_id = mlflow.create_experiment("fresh", artifact_location=location)
    model, optimizer, scheduler = digits_setup()
    train_steps(model, optimizer, scheduler, steps=5)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_checkpoint(model, optimizer, epoch=3, step=5, scheduler=scheduler)

    x = torch.randn(8, 64)
    model.eval()
    expected_out = model(x)
    out = tmp_path / "child.pt"
    torch.save(x, f"{out}.x")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, run.info.run_id, str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = torch.load(out, weights_only=True)

    # The state differed before loading ...
    assert not torch.equal(DigitsMLP(hidden=32, dropout=0.3).eval()(x), expected_out)
    # ... and matches after, bit for bit, in eval mode.
    assert result["training"] is False
    assert torch.equal(result["eval_out"], expected_out)
    assert (result["epoch"], result["step"]) == (3, 5)

    # One more training step from the loaded objects equals the step the original takes.
    model.train()
    torch.manual_seed(123)
    batch, target = torch.randn(16, 64), torch.randint(0, 10, (16,))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(batch), target).backward()
    optimizer.step()
    scheduler.step()
    for key, value in model.state_dict().items():
        assert torch.equal(result["params"][key], value), key
    expected_optim = optimizer.state_dict()
    assert result["optim"]["param_groups"] == expected_optim["param_groups"]
    for index, state in expected_optim["state"].items():
        for name, tensor in state.items():
            assert torch.equal(result["optim"]["state"][index][name], tensor), (index, name)
    assert result["lr"] == optimizer.param_groups[0]["lr"]


PLAIN_CHILD = textwrap.dedent(
    """
    import sys, mlflow, tracking
    from pipelines.models import Model
    with mlflow.start_run(experiment_id=sys.argv[1]) as run:
        tracking.log_state_dict(Model(4), model_kwargs={"n_input_features": 4})
    print(type(tracking.load_model(run.info.run_id)).__name__)
    print(sorted(m for m in ("torch.distributed.fsdp", "torch.distributed.tensor") if m in sys.modules))
    """
)


def test_a_plain_models_save_and_load_leave_torchs_sharding_modules_unimported(
    tracking_store: str, tmp_path: Path
) -> None:
    # Asking whether a model is sharded (FSDP2, DTensor) must not import those modules: 0.6 s of CPU for every
    # process that saves or loads a model of its own without an optimizer.
    experiment_id = mlflow.create_experiment("plain", artifact_location=(tmp_path / "artifacts").as_uri())
    child = subprocess.run([sys.executable, "-c", PLAIN_CHILD, experiment_id], cwd=REPO, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines()[-2:] == ["Model", "[]"], child.stdout


# ------------------------------------------------------------ in process


def test_loaded_optimizer_state_equals_saved(experiment: str) -> None:
    model, optimizer, scheduler = digits_setup()
    train_steps(model, optimizer, scheduler, steps=3)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1, scheduler=scheduler)
    loaded = tracking.load(run.info.run_id, mode="train")
    assert loaded.model.training
    assert isinstance(loaded.optimizer, torch.optim.Adam)
    assert isinstance(loaded.scheduler, torch.optim.lr_scheduler.StepLR)
    assert loaded.scheduler.state_dict() == scheduler.state_dict()
    saved, restored = optimizer.state_dict(), loaded.optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    for index, state in saved["state"].items():
        for name, tensor in state.items():
            assert torch.equal(restored["state"][index][name], tensor)


def test_restore_loads_into_existing_objects_and_returns_what_load_returns(experiment: str) -> None:
    model, optimizer, scheduler = digits_setup()
    train_steps(model, optimizer, scheduler, steps=3)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(
            model, optimizer, epoch=2, step=3, scheduler=scheduler, metrics={"val_loss": 0.5},
            extra={"note": "kept"}, rank_state={"rng": [1, 2]},
        )  # fmt: skip
    fresh, fresh_optimizer, fresh_scheduler = digits_setup(seed=1)

    restored = tracking.restore(run.info.run_id, fresh, fresh_optimizer, fresh_scheduler)
    loaded = tracking.load(run.info.run_id)

    assert restored.model is fresh and restored.optimizer is fresh_optimizer and restored.scheduler is fresh_scheduler
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    saved, into = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert into["param_groups"] == saved["param_groups"]
    for index, state in saved["state"].items():
        assert all(torch.equal(into["state"][index][name], tensor) for name, tensor in state.items())
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    for result in (restored, loaded):
        assert (result.epoch, result.step, result.metrics, result.extra) == (2, 3, {"val_loss": 0.5}, {"note": "kept"})
        assert (result.rank_state, result.run_id, result.path) == ({"rng": [1, 2]}, run.info.run_id, loaded.path)
        assert result.model_id == loaded.model_id is not None


def test_multiple_param_groups_are_rebuilt(experiment: str) -> None:
    model, _, _ = digits_setup()
    layers = list(model.net)
    optimizer = torch.optim.SGD(
        [{"params": layers[0].parameters(), "lr": 0.1}, {"params": layers[-1].parameters()}], lr=0.01
    )
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1)
    loaded = tracking.load(run.info.run_id, model=DigitsMLP(hidden=32, dropout=0.3))
    assert loaded.optimizer is not None
    assert [g["lr"] for g in loaded.optimizer.param_groups] == [0.1, 0.01]


def test_best_latest_epoch_and_step_pick_the_right_checkpoint(experiment: str) -> None:
    model, optimizer = Model(6), None
    checkpointer = tracking.Checkpointer(monitor="val_loss")
    with mlflow.start_run() as run:
        for epoch, loss in [(1, 0.9), (2, 0.3), (3, 0.5)]:
            with torch.no_grad():
                model.linear.bias.fill_(epoch)
            checkpointer.save(model, optimizer, epoch=epoch, step=epoch * 10, metrics={"val_loss": loss})
    run_id = run.info.run_id
    assert tracking.load(run_id).epoch == 3
    best = tracking.load(run_id, "best")
    assert (best.epoch, best.metrics, float(best.model.linear.bias.detach())) == (2, {"val_loss": 0.3}, 2.0)
    assert tracking.load(run_id, 1).epoch == 1
    assert tracking.load(run_id, "1").epoch == 1
    assert tracking.load(f"runs:/{run_id}", step=30).epoch == 3
    assert float(tracking.load_model(run_id, checkpoint="best").linear.bias.detach()) == 2.0
    assert float(tracking.load_state_dict(run_id, checkpoint=1)["linear.bias"]) == 1.0


def test_a_models_uri_of_a_checkpoint_loads_exactly_that_checkpoint(experiment: str) -> None:
    model = Model(6)
    logged = {}
    with mlflow.start_run() as run:
        for epoch in (1, 2, 3):
            with torch.no_grad():
                model.linear.bias.fill_(epoch)
            logged[epoch] = tracking.log_checkpoint(model, epoch=epoch)
    run_id = run.info.run_id
    second = logged[2]
    assert second.uri == f"models:/{second.model_id}"
    loaded = tracking.load(second.uri)
    assert (loaded.epoch, loaded.model_id, loaded.run_id) == (2, second.model_id, run_id)
    assert float(loaded.model.linear.bias.detach()) == 2.0
    assert float(tracking.load_model(logged[1].uri, model=Model(6)).linear.bias.detach()) == 1.0
    assert float(tracking.load_state_dict(logged[1].uri)["linear.bias"]) == 1.0
    assert tracking.resolve_run_id(second.uri) == run_id
    with pytest.raises(ValueError, match="names one checkpoint already"):
        tracking.load(second.uri, checkpoint=3)
    with pytest.raises(ValueError, match="is not a checkpoint"):
        tracking.load(f"runs:/{run_id}/model")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        tracking.load(f"runs:/{run_id}/checkpoints/epoch_0002")
    with pytest.raises(tracking.NotFoundError, match="no such logged model"):
        tracking.load(f"models:/m-{'0' * 32}")


def test_registry_alias_and_version_lead_to_the_registered_checkpoint(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=4)
        tracking.log_checkpoint(model, epoch=5)
    version = tracking.register(run.info.run_id, "seed-model", checkpoint=4, alias="champion")
    assert str(version.version) == "1"
    loaded = tracking.load("models:/seed-model@champion")
    assert (loaded.run_id, loaded.epoch) == (run.info.run_id, 4)
    assert tracking.load("models:/seed-model/1").epoch == 4
    assert tracking.resolve_run_id("models:/seed-model@champion") == run.info.run_id
    with pytest.raises(tracking.NotFoundError, match=r"models:/seed-model@nope: no such registered model"):
        tracking.load("models:/seed-model@nope")


def test_a_registered_whole_model_is_not_loaded_as_a_checkpoint(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run():
        tracking.log_checkpoint(model, epoch=4)
        # requirements given: MLflow would infer them by loading the model in a subprocess (10+ s)
        tracking.log_model(model, registered_model_name="whole-model", pip_requirements=["torch"])
    MlflowClient().set_registered_model_alias("whole-model", "champion", "1")
    with pytest.raises(tracking.NotFoundError, match=r"not a checkpoint.*load_pickled_model"):
        tracking.load("models:/whole-model@champion")
    loaded = tracking.load_pickled_model("models:/whole-model@champion", trust_pickle=True)
    assert torch.equal(loaded.linear.weight, model.linear.weight)


def test_whole_model_needs_an_explicit_opt_in(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_model(model, pip_requirements=["torch"])  # not inferred: 10+ s, not under test
    with pytest.raises(ValueError, match="trust_pickle=True"):
        tracking.load_pickled_model(run.info.run_id)
    loaded = tracking.load_pickled_model(run.info.run_id, trust_pickle=True)
    assert torch.equal(loaded.linear.weight, model.linear.weight)
    assert not loaded.training


@pytest.mark.parametrize("how", ["logged model", "files"])
def test_stale_latest_tag_falls_back_to_the_search(experiment: str, how: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
        second = tracking.log_checkpoint(model, epoch=2)
    assert MlflowClient().get_run(run.info.run_id).data.tags[layout.TAG_LATEST] == second.model_id
    # Deleted by hand: the tag still names epoch 2's model.
    if how == "logged model":
        MlflowClient().delete_logged_model(second.model_id)
    else:
        store = find_checkpoint(run.info.run_id, 2).store
        for name in (layout.MANIFEST_FILE, layout.CHECKPOINT_FILE):
            store.delete(name)
    assert tracking.load(run.info.run_id).epoch == 1


def test_best_by_search_skips_a_ready_model_whose_manifest_is_gone(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        for epoch, loss in [(1, 0.5), (2, 0.1), (3, 0.9)]:
            tracking.log_checkpoint(model, epoch=epoch, metrics={"loss": loss}, monitor="loss")
    MlflowClient().delete_tag(run.info.run_id, layout.TAG_BEST)  # best by search
    # What a retention that died between the manifest and the logged model leaves: READY, no manifest.
    find_checkpoint(run.info.run_id, 2).store.delete(layout.MANIFEST_FILE)
    assert tracking.load(run.info.run_id, "best").epoch == 1
    assert [c.epoch for c in tracking.list_checkpoints(run.info.run_id)] == [1, 3]


# ------------------------------------------------------------ integrity and safety


def checkpoint_model(run_id: str, epoch: int) -> Any:
    """The READY logged model of the run's checkpoint of ``epoch`` (the newest), as MLflow lists it.

    Found without the library (its manifest may be what a test broke).
    """
    client = MlflowClient()
    models = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{layout.checkpoint_name(epoch)}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    ready = [model for model in models if str(model.status) == "READY"]
    assert ready, f"run {run_id} has no READY checkpoint of epoch {epoch}"
    return ready[0]


def rewrite(run_id: str, epoch: int | None, name: str, change: Any) -> None:
    """Replace a stored file's bytes behind the library's back: a file of epoch ``epoch``'s
    checkpoint (its logged model's artifacts), or of the run's artifacts (``epoch=None``)."""
    if epoch is None:
        uri = MlflowClient().get_run(run_id).info.artifact_uri
    else:
        uri = checkpoint_model(run_id, epoch).artifact_location
    if uri.startswith("file://"):
        local = Path(uri.removeprefix("file://")) / name
        local.write_bytes(change(local.read_bytes()))
        return
    key = f"{uri.removeprefix(f's3://{BUCKET}/')}/{name}"
    s3 = boto3.client("s3", region_name="us-east-1")
    data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=change(data))


def test_flipped_byte_is_caught(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(model, epoch=1)

    def flip(data: bytes) -> bytes:
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]

    rewrite(run.info.run_id, 1, "checkpoint.pt", flip)
    expected = logged.manifest.files["checkpoint.pt"].sha256
    for call in (lambda: tracking.load(run.info.run_id), lambda: tracking.load(logged.uri)):
        with pytest.raises(tracking.IntegrityError) as caught:
            call()
        message = str(caught.value)
        assert run.info.run_id in message and logged.model_id in message and "checkpoint.pt" in message
        assert expected in message


def tamper_manifest(run_id: str, epoch: int, change: Any) -> None:
    """Edit the manifest of epoch ``epoch``'s checkpoint as JSON, behind the library's back."""

    def edit(data: bytes) -> bytes:
        manifest = json.loads(data)
        change(manifest)
        return json.dumps(manifest).encode()

    rewrite(run_id, epoch, layout.MANIFEST_FILE, edit)


def test_os_system_manifest_is_refused_before_anything_runs(experiment: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    marker = tmp_path / "pwned"

    def point_at_os_system(manifest: dict[str, Any]) -> None:
        manifest["model"] = {"class": "os:system", "init_kwargs": {"command": f"touch {marker}"}}

    tamper_manifest(run.info.run_id, 1, point_at_os_system)
    with pytest.raises(tracking.UnsafeClassError, match="refusing to instantiate os:system"):
        tracking.load(run.info.run_id)
    with pytest.raises(tracking.UnsafeClassError):
        tracking.load_model(run.info.run_id)
    assert not marker.exists()


def test_optimizer_class_outside_torch_optim_is_refused(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)

    def swap(manifest: dict[str, Any]) -> None:
        manifest["optimizer"]["class"] = "subprocess:Popen"

    tamper_manifest(run.info.run_id, 1, swap)
    with pytest.raises(tracking.UnsafeClassError, match="subprocess:Popen"):
        tracking.load(run.info.run_id)


def test_class_that_no_longer_imports(experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)

    def rename(manifest: dict[str, Any]) -> None:
        manifest["model"]["class"] = "old_project.models:Model"

    tamper_manifest(run.info.run_id, 1, rename)
    with pytest.raises(tracking.NotFoundError, match=r"module 'old_project.models'.*pass model="):
        tracking.load(run.info.run_id)
    assert tracking.load(run.info.run_id, model=Model(6)).epoch == 1


def test_a_model_class_defined_inside_a_function_is_said_to_be_so(s3_experiment: str) -> None:
    """A class defined in a function (a training script's main(), a test) is recorded as `f.<locals>.Net`: the
    load said "The code changed since the run", which sent users looking for a change that was never made."""

    @tracking.rebuildable
    class Net(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(width, 2)

    with mlflow.start_run() as run:
        tracking.log_checkpoint(Net(3), epoch=1)
    with pytest.raises(tracking.NotFoundError) as refused:
        tracking.load(run.info.run_id)
    assert "<locals>.Net was defined inside a function" in str(refused.value)
    assert "pass model=" in str(refused.value) and "code changed" not in str(refused.value)
    assert tracking.load(run.info.run_id, model=Net(3)).epoch == 1


@tracking.rebuildable
class Labelled(nn.Module):
    def __init__(self, id2label: dict[int, str]) -> None:
        super().__init__()
        self.id2label = id2label
        self.fc = nn.Linear(2, len(id2label))


def test_init_arguments_that_json_would_change_are_not_recorded_as_if_they_were_kept(s3_experiment: str) -> None:
    """JSON writes an int key as a string: a model built with id2label={0: "cat", 1: "dog"} was rebuilt with
    {"0": "cat", "1": "dog"}, and its lookups by class index failed only once it was in use."""
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Labelled({0: "cat", 1: "dog"}), epoch=1)
    with pytest.raises(tracking.NotFoundError, match=r"init arguments of .*Labelled were not recorded.*pass model="):
        tracking.load(run.info.run_id)
    loaded = tracking.load(run.info.run_id, model=Labelled({0: "cat", 1: "dog"})).model
    assert loaded.id2label == {0: "cat", 1: "dog"}
    with pytest.raises(ValueError, match="string keys"):
        tracking.log_checkpoint(
            Labelled({0: "cat"}), epoch=2, run_id=run.info.run_id, model_kwargs={"id2label": {0: "cat"}}
        )


def test_a_class_given_as_model_that_the_recorded_arguments_cannot_build_says_what_to_pass(experiment: str) -> None:
    # The hint said "pass model=<an instance or a factory>" to a user who had passed model=<a class>.
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)

    class Renamed(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(width, 2)

    with pytest.raises(tracking.NotFoundError) as refused:
        tracking.load(run.info.run_id, model=Renamed)
    assert "built with the run's recorded arguments" in str(refused.value)
    assert "model=Renamed(...)" in str(refused.value) and "lambda: Renamed(...)" in str(refused.value)


def test_newer_and_malformed_manifests(experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
        tracking.log_checkpoint(Model(6), epoch=2)

    def newer(manifest: dict[str, Any]) -> None:
        manifest["format_version"] = 99

    tamper_manifest(run.info.run_id, 1, newer)
    with pytest.raises(tracking.IntegrityError, match=r"format_version 99.*upgrade"):
        tracking.load(run.info.run_id, 1)
    rewrite(run.info.run_id, 2, "manifest.json", lambda data: data[:20])
    with pytest.raises(
        tracking.IntegrityError, match=r"checkpoint-epoch-0002 \(m-[0-9a-f]{32}\): manifest\.json is not valid"
    ):
        tracking.load(run.info.run_id, 2)


def test_architecture_mismatch_lists_keys_and_shapes(experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(DigitsMLP(hidden=32), epoch=1)
    with pytest.raises(
        tracking.MismatchError, match=r"shape mismatches \[.*'net.0.weight: stored \(32, 64\) vs model \(16, 64\)'"
    ):
        tracking.load(run.info.run_id, model=DigitsMLP(hidden=16))

    class Wider(DigitsMLP):
        def __init__(self) -> None:
            super().__init__(hidden=32)
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(tracking.MismatchError, match=r"missing keys \['extra.bias', 'extra.weight'\]"):
        tracking.load(run.info.run_id, model=Wider())
    loaded = tracking.load(run.info.run_id, model=Wider(), strict=False)
    assert torch.equal(loaded.model.net[0].weight, tracking.load(run.info.run_id).model.net[0].weight)


def test_unknown_run_no_checkpoints_and_missing_epoch(experiment: str) -> None:
    with pytest.raises(tracking.NotFoundError, match="run ffffffffffffffffffffffffffffffff not found"):
        tracking.load("ffffffffffffffffffffffffffffffff")
    with mlflow.start_run() as run:
        pass
    with pytest.raises(tracking.NotFoundError, match="has no committed checkpoints"):
        tracking.load(run.info.run_id)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=2)
        tracking.log_checkpoint(Model(6), epoch=4)
    with pytest.raises(tracking.NotFoundError, match=r"no committed checkpoint for epoch 3.*committed epochs: 2, 4"):
        tracking.load(run.info.run_id, 3)
    with pytest.raises(tracking.NotFoundError, match="records no best checkpoint"):
        tracking.load(run.info.run_id, "best")
    with pytest.raises(ValueError, match="'latest', 'best' or an epoch"):
        tracking.load(run.info.run_id, "newest")


def test_deleted_checkpoint_file(experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    find_checkpoint(run.info.run_id, 1).store.delete(layout.CHECKPOINT_FILE)
    with pytest.raises(tracking.NotFoundError, match="listed in its manifest but missing"):
        tracking.load(run.info.run_id)


def test_a_load_modifies_nothing_on_the_store(experiment: str) -> None:
    model, optimizer, scheduler = digits_setup()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1, scheduler=scheduler)
        tracking.log_state_dict(model)
    stores = [open_run(run.info.run_id).store, find_checkpoint(run.info.run_id, 1).store]
    model_id = find_checkpoint(run.info.run_id, 1).model_id
    assert model_id is not None

    def snapshot() -> list[dict[str, str]]:
        return [{path: hashlib.sha256(s.read(path)).hexdigest() for path in s.list_files("")} for s in stores]

    def described() -> tuple[Any, ...]:
        client = MlflowClient()
        logged = client.get_logged_model(model_id)
        return client.get_run(run.info.run_id).data.tags, logged.tags, str(logged.status), logged.params

    before = snapshot()
    assert all(before)
    described_before = described()
    tracking.load(run.info.run_id)
    tracking.load(f"models:/{model_id}")
    tracking.load_model(run.info.run_id)
    tracking.load_state_dict(run.info.run_id)
    tracking.list_checkpoints(run.info.run_id)
    assert snapshot() == before
    assert described() == described_before


def test_cuda_map_location(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)
    if torch.cuda.is_available():
        assert tracking.load(run.info.run_id, map_location="cuda").model.linear.weight.is_cuda
    else:
        with pytest.raises(tracking.ConfigError, match="CUDA is not available"):
            tracking.load(run.info.run_id, map_location="cuda")


def test_scheduler_factory_keeps_the_loaded_learning_rate(experiment: str) -> None:
    # A warm-up scheduler rewrites lr when constructed; the loaded lr must survive that.
    model = Model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    saved_lr = optimizer.param_groups[0]["lr"]
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=5, scheduler=scheduler)

    def warmup(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)

    for factory in (None, warmup):
        loaded = tracking.load(run.info.run_id, scheduler=factory)
        assert loaded.optimizer is not None
        assert loaded.optimizer.param_groups[0]["lr"] == saved_lr
        assert loaded.scheduler.last_epoch == 5


def test_an_optimizer_scheduler_or_scaler_given_for_a_checkpoint_saved_without_one_is_said_to_be_left_as_it_is(
    s3_experiment: str,
) -> None:
    model, optimizer, scheduler = digits_setup()
    train_steps(model, optimizer, scheduler, steps=3)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1)  # no scheduler
        tracking.log_checkpoint(model, None, epoch=2)  # the weights alone
        tracking.log_checkpoint(model, optimizer, epoch=3, scheduler=scheduler)  # all of it
    run_id = run.info.run_id

    def said(call: Any) -> str:
        with pytest.warns(UserWarning) as caught:
            call()
        (warning,) = [str(w.message) for w in caught if "holds no" in str(w.message)]  # once, whatever is left out
        return warning

    fresh, fresh_optimizer, fresh_scheduler = digits_setup(seed=1)
    scheduler_before = fresh_scheduler.state_dict()
    warning = said(lambda: tracking.restore(run_id, fresh, fresh_optimizer, fresh_scheduler, checkpoint=1))
    assert warning.startswith(f"run {run_id}: checkpoint-epoch-0001 (m-"), warning
    assert "holds no scheduler state" in warning and "scheduler= given to tracking.restore is left as it is" in warning
    assert "Pass scheduler=None" in warning, warning
    assert fresh_scheduler.state_dict() == scheduler_before  # left as it is; the optimizer was loaded
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]

    def halving(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    loaded: list[Any] = []
    warning = said(lambda: loaded.append(tracking.load(run_id, 1, mode="train", scheduler=halving)))
    assert "given to tracking.load is not used: the result's scheduler is None" in warning, warning
    assert loaded[0].optimizer is not None and loaded[0].scheduler is None

    # The weights alone: both named in one warning, the model restored and the rest left as it is.
    spare, spare_scheduler = digits_setup(seed=1)[1:]
    warning = said(lambda: tracking.restore(run_id, fresh, spare, spare_scheduler, checkpoint=2))
    assert "checkpoint-epoch-0002" in warning and "holds no optimizer or scheduler state" in warning, warning
    assert "Pass optimizer=None and scheduler=None" in warning, warning
    warning = said(lambda: loaded.append(tracking.load(run_id, 2, optimizer=torch.optim.SGD)))
    assert "the result's optimizer is None" in warning and loaded[-1].optimizer is None, warning
    assert spare.state_dict()["state"] == {}  # never stepped: nothing was loaded into it
    # An AMP scaler too.
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    warning = said(lambda: tracking.restore(run_id, fresh, fresh_optimizer, fresh_scheduler, scaler, checkpoint=3))
    assert "holds no scaler state" in warning and "Pass scaler=None" in warning, warning
    assert scaler.state_dict()["scale"] == 64.0

    # A checkpoint that holds them all says nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracking.restore(run_id, fresh, fresh_optimizer, fresh_scheduler, checkpoint=3)
        tracking.load(run_id, 3, mode="train", optimizer=torch.optim.Adam, scheduler=halving)


def test_a_scheduler_without_the_optimizer_it_drives_is_refused_at_every_save_and_restore(s3_experiment: str) -> None:
    # Stored, it would load as nothing: a load rebuilds a scheduler over its optimizer, and there is none.
    model, optimizer, scheduler = digits_setup()
    train_steps(model, optimizer, scheduler, steps=3)
    refused = r"scheduler= is one StepLR and optimizer= is None: .* pass that optimizer as optimizer=, or scheduler="
    with mlflow.start_run() as run:
        with pytest.raises(TypeError, match=refused):
            tracking.log_checkpoint(model, None, epoch=1, scheduler=scheduler)
        with pytest.raises(TypeError, match=refused):  # at its first call, not at the first save due (epoch 5)
            tracking.Checkpointer(every_n_epochs=5).save(model, epoch=1, scheduler=scheduler)
        assert tracking.list_checkpoints(run.info.run_id) == []
        tracking.log_checkpoint(model, optimizer, epoch=2, scheduler=scheduler)
    fresh, _, fresh_scheduler = digits_setup(seed=1)
    before = fresh_scheduler.state_dict()
    with pytest.raises(TypeError, match=refused):
        tracking.restore(run.info.run_id, fresh, scheduler=fresh_scheduler)
    assert fresh_scheduler.state_dict() == before


def test_a_checkpoint_stored_with_a_scheduler_and_no_optimizer_loads_without_it_and_says_how_to_get_it(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler = digits_setup()
    train_steps(model, optimizer, scheduler, steps=3)
    # Stored as log_checkpoint stored it before it refused a scheduler without its optimizer.
    with monkeypatch.context() as patch, mlflow.start_run() as run:
        patch.setattr(optimizers, "check", lambda *args: None)
        tracking.log_checkpoint(model, None, epoch=1, scheduler=scheduler)
    run_id = run.info.run_id
    said = rf"run {run_id}: checkpoint-epoch-0001 .* holds a scheduler state and no optimizer state"
    with pytest.warns(UserWarning, match=said) as w:
        loaded = tracking.load(run_id, mode="train")
    assert "the result's scheduler is None" in str(w[0].message) and "tracking.restore(" in str(w[0].message)
    assert loaded.optimizer is None and loaded.scheduler is None
    # Nothing stored is lost: restored with an optimizer to drive, as the warning says.
    fresh, fresh_optimizer, fresh_scheduler = digits_setup(seed=1)
    with pytest.warns(UserWarning, match="holds no optimizer state"):
        tracking.restore(run_id, fresh, fresh_optimizer, fresh_scheduler)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


def test_a_warning_every_rank_of_a_job_reaches_is_said_on_rank_0_alone(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler = digits_setup()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1)  # no scheduler
    run_id = run.info.run_id

    def said(rank: int) -> list[str]:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracking.load(run_id, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2))
            tracking.restore(run_id, model, optimizer, scheduler)
        return [str(w.message) for w in caught]

    on_rank0 = said(0)
    assert len([m for m in on_rank0 if "holds no scheduler state" in m]) == 2, on_rank0  # load's and restore's
    assert said(1) == []


def test_amp_scaler_is_rebuilt(experiment: str) -> None:
    model = Model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1, scaler=scaler)
    loaded = tracking.load(run.info.run_id)
    assert isinstance(loaded.scaler, torch.amp.GradScaler)
    assert loaded.scaler.state_dict() == scaler.state_dict()


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.Adam, torch.optim.RMSprop])
def test_optimizers_rebuild_from_the_manifest_alone(s3_experiment: str, optimizer: type) -> None:
    """AdamW's defaults hold an argument (decoupled_weight_decay) its constructor refuses."""
    model, _, _ = digits_setup()
    optim = optimizer(model.parameters(), lr=3e-3, weight_decay=0.1)
    train_steps(model, optim, torch.optim.lr_scheduler.StepLR(optim, step_size=2), 2)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optim, epoch=2)
    loaded = tracking.load(run.info.run_id, mode="train")
    assert type(loaded.optimizer) is optimizer
    assert loaded.optimizer.state_dict()["param_groups"] == optim.state_dict()["param_groups"]


# ------------------------------------------------ arguments are the caller's, stored fields the checkpoint's


def seed_with_momentum() -> tuple[Model, torch.optim.SGD]:
    model = Model(6)
    # Two groups, one parameter each, of different shapes: weight (1, 6), bias (1,).
    optimizer = torch.optim.SGD(
        [{"params": [model.linear.weight]}, {"params": [model.linear.bias], "lr": 0.5}], lr=0.1, momentum=0.9
    )
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda run: tracking.load(run, map_location="bogus"), ValueError, "map_location='bogus' is not a device"),
        (lambda run: tracking.load_model(run, map_location="cuda:x"), ValueError, "map_location='cuda:x'"),
        (lambda run: tracking.load_state_dict(run, map_location=7), TypeError, "map_location must be"),
        (lambda run: tracking.load(run, map_location={"cuda:1": "cuda:0"}), TypeError, r"-> 'cuda:0'"),
        (lambda run: tracking.load(run, map_location=lambda storage, loc: storage), TypeError, "remapping"),
        (lambda run: tracking.load(run, scheduler="nope"), TypeError, "scheduler must be a factory"),
        (lambda run: tracking.load(run, optimizer=3), TypeError, "optimizer must be a factory"),
        (lambda run: tracking.restore(run, Model(6), scaler=object()), TypeError, "scaler must be an object with"),
        (lambda run: tracking.restore(run, Model(6), scheduler="nope"), TypeError, "scheduler must be an object"),
        (lambda run: tracking.restore(run, "model"), TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_argument_mistakes_name_the_argument_not_the_file(
    s3_experiment: str, call: Any, error: type[Exception], match: str
) -> None:
    model, optimizer = seed_with_momentum()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1)
    with pytest.raises(error, match=match) as caught:
        call(run.info.run_id)
    assert "checkpoint.pt" not in str(caught.value)


def replace_payload(run_id: str, epoch: int, change: Any) -> None:
    """Rewrite epoch ``epoch``'s checkpoint.pt with ``change`` applied to its dict, and its manifest's digest:
    a file that matches its manifest but holds what log_checkpoint never writes."""
    import io

    stored: dict[str, bytes] = {}

    def edit(raw: bytes) -> bytes:
        payload = torch.load(io.BytesIO(raw), weights_only=True)
        change(payload)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        stored["raw"] = buffer.getvalue()
        return stored["raw"]

    rewrite(run_id, epoch, layout.CHECKPOINT_FILE, edit)
    digest = {"size": len(stored["raw"]), "sha256": hashlib.sha256(stored["raw"]).hexdigest()}
    tamper_manifest(run_id, epoch, lambda m: m["files"].update({layout.CHECKPOINT_FILE: digest}))


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        (lambda p: p.update(model_state=5), tracking.IntegrityError, "'model_state' is of type int"),
        (lambda p: p.update(optim_state="adam"), tracking.IntegrityError, "'optim_state' is of type str"),
        (lambda p: p["optim_state"]["param_groups"].pop(), tracking.MismatchError, "'optim_state' has 1 param groups"),
        (lambda p: p.update(scaler_state={"scale": 2.0}), tracking.MismatchError, "'scaler_state' does not load"),
        (lambda p: p.update(scaler_state=[1]), tracking.IntegrityError, "'scaler_state' is of type list"),
    ],
)
def test_a_checkpoint_holding_wrong_typed_states_names_run_checkpoint_and_field(
    s3_experiment: str, change: Any, error: type[Exception], field: str
) -> None:
    model, optimizer = seed_with_momentum()
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(model, optimizer, epoch=1, scaler=torch.amp.GradScaler("cpu"))
    replace_payload(run.info.run_id, 1, change)
    with pytest.raises(error) as caught:
        tracking.load(run.info.run_id)
    message = str(caught.value)
    assert f"run {run.info.run_id}: checkpoint-epoch-0001 ({logged.model_id})" in message and field in message


def test_swapped_param_groups_do_not_load_momentum_into_the_wrong_parameter(s3_experiment: str) -> None:
    model, optimizer = seed_with_momentum()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, optimizer, epoch=1)
    assert tracking.load(run.info.run_id).optimizer is not None

    def swap(manifest: dict[str, Any]) -> None:
        groups = manifest["optimizer"]["param_groups"]
        groups[0]["params"], groups[1]["params"] = groups[1]["params"], groups[0]["params"]

    tamper_manifest(run.info.run_id, 1, swap)
    with pytest.raises(tracking.MismatchError, match=r"momentum_buffer of shape \(1, 6\) for parameter linear\.bias"):
        tracking.load(run.info.run_id)


def test_a_reader_between_ready_and_the_tags_is_told_to_retry_not_to_pass_monitor(s3_experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1, metrics={"acc": 0.5}, monitor="acc", mode="max")
    # What a reader sees while the first save is committed: a READY checkpoint, no pointer tags yet.
    client = MlflowClient()
    for tag in [k for k in client.get_run(run.info.run_id).data.tags if k.startswith("tracking.checkpoint.")]:
        client.delete_tag(run.info.run_id, tag)
    with pytest.raises(tracking.NotFoundError) as caught:
        tracking.load(run.info.run_id, "best")
    assert "retry in a moment" in str(caught.value) and "monitor=" not in str(caught.value)


def test_a_tracking_server_failure_when_opening_the_run_says_what_to_do(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)

    def failing(self: MlflowClient, run_id: str) -> Any:
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 503 != 200")

    monkeypatch.setattr(MlflowClient, "get_run", failing)
    with pytest.raises(tracking.StorageError) as caught:
        tracking.load(run.info.run_id)
    message = str(caught.value)
    assert message.startswith(f"run {run.info.run_id}: the tracking server") and "503" in message
    assert "MLFLOW_TRACKING_URI" in message and message.endswith("then retry.")


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_a_wrapped_model_is_saved_and_loaded_as_the_module_it_wraps(s3_experiment: str, wrap: Any) -> None:
    model = Model(6)
    wrapped = wrap(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()  # the wrapper shares the parameters (compiling is not under test)
    optimizer.step()
    with mlflow.start_run() as run:
        tracking.log_checkpoint(wrapped, optimizer, epoch=1)
        tracking.log_state_dict(wrapped)
    run_id = run.info.run_id
    # Stored without the wrapper's "_orig_mod." / "module." prefixes: any model of the class takes them.
    plain = {"linear.weight", "linear.bias"}
    assert set(tracking.load_state_dict(run_id)) == set(tracking.load_state_dict(run_id, checkpoint=1)) == plain
    loaded = tracking.load(run_id)
    assert type(loaded.model) is Model and torch.equal(loaded.model.linear.weight, model.linear.weight)
    # ... and so does a wrapped one.
    target = wrap(Model(6))
    target_optimizer = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    tracking.restore(run_id, target, target_optimizer)
    assert torch.equal(target.state_dict()[next(iter(target.state_dict()))], next(iter(wrapped.state_dict().values())))
    assert target_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    again = tracking.load(run_id, model=wrap(Model(6)), mode="train")
    assert again.optimizer is not None and torch.equal(
        again.optimizer.state_dict()["state"][0]["momentum_buffer"],
        optimizer.state_dict()["state"][0]["momentum_buffer"],
    )
    weights = tracking.load_model(run_id, model=wrap(Model(6))).state_dict()
    assert all(torch.equal(w, v) for w, v in zip(weights.values(), wrapped.state_dict().values(), strict=True))


@pytest.mark.parametrize("gone", ["module", "class"])
def test_a_whole_model_whose_class_is_not_importable_says_which_code_to_install(
    s3_experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    # The reviewer's machine has tracking and torch, not the training code the pickle names.
    (tmp_path / "trainer_code.py").write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(3, 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import trainer_code  # type: ignore[import-not-found]

    with mlflow.start_run() as run:
        tracking.log_model(trainer_code.Net(), pip_requirements=["torch"])  # not inferred: 10+ s, not under test
    monkeypatch.delitem(sys.modules, "trainer_code")
    if gone == "module":
        (tmp_path / "trainer_code.py").unlink()
    else:  # the code is there, but the class was renamed since
        (tmp_path / "trainer_code.py").write_text("class Renamed:\n    pass\n")
    with pytest.raises(tracking.NotFoundError, match=r"pickle of a class this process cannot import.*trainer_code"):
        tracking.load_pickled_model(run.info.run_id, trust_pickle=True)


@pytest.mark.parametrize(
    ("wrap", "prefix"), [(torch.compile, "_orig_mod."), (nn.DataParallel, "module.")], ids=["compile", "DataParallel"]
)
def test_a_checkpoint_whose_keys_carry_a_wrappers_prefix_loads_into_a_plain_model(
    s3_experiment: str, wrap: Any, prefix: str
) -> None:
    from tracking.checkpoint import snapshot_checkpoint
    from tracking.commit import commit_checkpoint

    torch.manual_seed(0)
    model = Model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # As an older version (or another tool) wrote it: the wrapper's state dict, every key prefixed.
    snapshot = snapshot_checkpoint(model, optimizer, epoch=1)
    snapshot.payload["model_state"] = wrap(model).state_dict()
    with mlflow.start_run() as run:
        commit_checkpoint(open_run(run.info.run_id), snapshot)
    run_id = run.info.run_id
    assert set(tracking.load_state_dict(run_id, checkpoint=1)) == {f"{prefix}linear.weight", f"{prefix}linear.bias"}

    def fits(loaded: nn.Module) -> bool:
        return torch.equal(loaded.linear.weight, model.linear.weight) and torch.equal(
            loaded.linear.bias, model.linear.bias
        )

    assert fits(tracking.load(run_id).model) and fits(tracking.load(run_id, model=Model(6), mode="train").model)
    # strict=False used to load none of the keys, silently.
    assert fits(tracking.load(run_id, model=Model(6), strict=False).model)
    assert fits(tracking.load_model(run_id, model=Model(6)))
    target = Model(6)
    tracking.restore(run_id, target, torch.optim.SGD(target.parameters(), lr=0.1))
    assert fits(target)


def test_rebuildable_refuses_a_class_with_positional_only_init_parameters_naming_them() -> None:
    """The manifest records init arguments by name: a class taking them before '/' logged, then every rebuild failed
    with "got some positional-only arguments passed as keyword arguments", long after the training."""
    with pytest.raises(TypeError, match=r"Net.__init__ takes 'width', 'depth' positional-only.*drop the '/'"):

        @tracking.rebuildable
        class Net(nn.Module):
            def __init__(self, width: int, depth: int, /, bias: bool = True) -> None:
                super().__init__()
                self.fc = nn.Linear(width, depth, bias=bias)

    @tracking.rebuildable
    class Kept(nn.Module):  # self alone before '/' is fine: every argument still goes by name
        def __init__(self, /, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(width, 2)

    assert Kept(3).fc.in_features == 3
