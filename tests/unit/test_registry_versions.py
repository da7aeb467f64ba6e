"""Registry versions load exactly the checkpoint they were made from, or say why they cannot."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import tracking
from pipelines.models import Model
from tracking import layout
from tracking.cli import main
from tracking.errors import NotFoundError


def test_a_version_made_from_a_runs_uri_is_refused_not_the_runs_current_latest(experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(model, epoch=1)
        client = MlflowClient()
        client.create_registered_model("seed")
        version = client.create_model_version("seed", source=f"runs:/{run_id}/anything", run_id=run_id)
        tracking.log_checkpoint(model, epoch=2)  # latest moves on after the version was made
    with pytest.raises(NotFoundError, match=rf"version {version.version} of 'seed'.*names no checkpoint.*register"):
        tracking.load(f"models:/seed/{version.version}")
    # The run it names is still found for what takes a run (listing its checkpoints).
    assert [c.epoch for c in tracking.list_checkpoints(f"models:/seed/{version.version}")] == [1, 2]


@pytest.mark.parametrize("alias", ["latest", "Latest", "v3", "bad alias!"])
def test_a_refused_alias_leaves_no_version_behind(experiment: str, alias: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    with pytest.raises(ValueError, match=rf"alias {alias!r} cannot be used"):
        tracking.register(run.info.run_id, "seed", checkpoint="latest", alias=alias)
    assert list(MlflowClient().search_model_versions("name = 'seed'")) == []
    cli = CliRunner().invoke(main, ["register", run.info.run_id, "seed", "--checkpoint", "latest", "--alias", alias])
    assert cli.exit_code == 2 and "cannot be used" in cli.output and "Traceback" not in cli.output
    assert list(MlflowClient().search_model_versions("name = 'seed'")) == []


def test_a_version_says_which_checkpoint_it_is_in_its_tags(s3_experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as by_epoch:
        tracking.log_checkpoint(model, epoch=1, step=10)
        tracking.log_checkpoint(model, epoch=2)  # no global step recorded: no step tag
    with mlflow.start_run() as by_step:
        tracking.log_checkpoint(model, epoch=0, step=1500, keyed_by="step")
    client = MlflowClient()

    version = tracking.register(by_epoch.info.run_id, "seed", checkpoint=1)
    stored = client.get_model_version("seed", version.version)
    assert stored.tags == {
        layout.VERSION_TAG_CHECKPOINT: "checkpoint-epoch-0001",
        layout.VERSION_TAG_KEYED_BY: "epoch",
        layout.VERSION_TAG_KEY: "1",
        layout.VERSION_TAG_EPOCH: "1",
        layout.VERSION_TAG_STEP: "10",
    }
    # What MLflow records itself, and the tags leave out: the run and the logged model.
    listed = tracking.list_checkpoints(by_epoch.info.run_id)
    assert (stored.run_id, stored.source) == (by_epoch.info.run_id, f"models:/{listed[0].model_id}")

    result = CliRunner().invoke(main, ["register", by_epoch.info.run_id, "seed", "--checkpoint", "2", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["tags"] == client.get_model_version("seed", printed["version"]).tags
    assert printed["tags"][layout.VERSION_TAG_CHECKPOINT] == "checkpoint-epoch-0002"
    assert layout.VERSION_TAG_STEP not in printed["tags"]
    assert (printed["key"], printed["keyed_by"], printed["epoch"], printed["step"]) == (2, "epoch", 2, None)
    assert (printed["run_id"], printed["model_id"]) == (by_epoch.info.run_id, listed[1].model_id)

    stepped = tracking.register(by_step.info.run_id, "seed", checkpoint="latest")
    assert client.get_model_version("seed", stepped.version).tags == {
        layout.VERSION_TAG_CHECKPOINT: "checkpoint-step-00001500",
        layout.VERSION_TAG_KEYED_BY: "step",
        layout.VERSION_TAG_KEY: "1500",
        layout.VERSION_TAG_EPOCH: "0",
        layout.VERSION_TAG_STEP: "1500",
    }


def test_log_model_under_a_name_holding_checkpoints_is_refused_unless_allowed(s3_experiment: str) -> None:
    model = Model(6)
    with mlflow.start_run() as run:
        tracking.log_checkpoint(model, epoch=1)
        tracking.register(run.info.run_id, "seed", checkpoint="latest", alias="champion")
        with pytest.raises(tracking.ConfigError) as refused:
            tracking.log_model(model, registered_model_name="seed", pip_requirements=["torch"])
        message = str(refused.value)
        assert "'seed' holds version 1 that is a checkpoint" in message, message
        assert "seed-models" in message and "allow_mixed=True" in message, message
        # Refused before anything is stored: no whole model logged, no version made.
        assert [m.name for m in mlflow.search_logged_models(output_format="list")] == ["checkpoint-epoch-0001"]
        assert len(MlflowClient().search_model_versions("name = 'seed'")) == 1
        mixed = tracking.log_model(model, registered_model_name="seed", allow_mixed=True, pip_requirements=["torch"])
        assert mixed.registered_model_version == 2
        # A name holding whole models only takes more without a word.
        tracking.log_model(model, registered_model_name="seed-models", pip_requirements=["torch"])
        again = tracking.log_model(model, registered_model_name="seed-models", pip_requirements=["torch"])
        assert again.registered_model_version == 2


def test_latest_and_stage_uris_load_the_newest_version_as_in_mlflow(s3_experiment: str) -> None:
    with mlflow.start_run() as run:
        for epoch in (1, 2, 3):
            tracking.log_checkpoint(Model(6), epoch=epoch)
    tracking.register(run.info.run_id, "seed", checkpoint=1)
    tracking.register(run.info.run_id, "seed", checkpoint=3)
    tracking.register(run.info.run_id, "team@seed", checkpoint=2, alias="champion")  # MLflow names may hold "@"
    with pytest.warns(FutureWarning):  # MLflow's stages are deprecated, and say so
        MlflowClient().transition_model_version_stage("seed", "1", "Production")

    assert tracking.load("models:/seed/latest").epoch == 3
    assert tracking.load("models:/seed/LATEST").epoch == 3
    with pytest.warns(FutureWarning):
        assert tracking.load("models:/seed/Production").epoch == 1
    assert tracking.load("models:/team@seed@champion").epoch == 2
    assert tracking.load("models:/team@seed/1").epoch == 2
    assert tracking.resolve_run_id("models:/seed/latest") == run.info.run_id
    with pytest.raises(NotFoundError, match=r"'seed' has no version in stage 'Staging'.*models:/seed@champion"):
        with pytest.warns(FutureWarning):
            tracking.load("models:/seed/Staging")
    with pytest.raises(NotFoundError, match=r"'v2' is no version number.*for version 2, write models:/seed/2"):
        with pytest.warns(FutureWarning):
            tracking.load("models:/seed/v2")
    result = CliRunner().invoke(main, ["show", "models:/seed/latest", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epoch"] == 3


@pytest.mark.parametrize("name", ["team/seed", "team:seed"])
def test_a_name_mlflow_refuses_is_a_usage_error_that_leaves_nothing_behind(s3_experiment: str, name: str) -> None:
    # MLflow refuses it only after the checkpoint is found (or the whole model logged): it was a StorageError,
    # "check that the tracking server runs, then retry", which no retry fixes.
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    with pytest.raises(ValueError, match=rf"name {name!r} cannot be used.*Pick another name \(e.g. team-seed\)"):
        tracking.register(run.info.run_id, name, checkpoint="latest")
    cli = CliRunner().invoke(main, ["register", run.info.run_id, name, "--checkpoint", "latest", "--json"])
    assert cli.exit_code == 2 and "cannot be used" in cli.stderr and "Traceback" not in cli.output
    assert json.loads(cli.stdout)["exit_code"] == 2
    with pytest.raises(ValueError, match=rf"name {name!r} cannot be used"):
        tracking.log_model(Model(6), run_id=run.info.run_id, registered_model_name=name)
    client = MlflowClient()
    assert list(client.search_registered_models()) == []
    assert [m.name for m in client.search_logged_models([run.info.experiment_id])] == ["checkpoint-epoch-0001"]


def test_a_checkpoint_lists_each_version_made_from_it_once_as_a_server_lists_them_too(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(Model(6), epoch=1)
    client = MlflowClient()
    created = MlflowClient.create_model_version

    def as_a_server(self: MlflowClient, name: str, *args: Any, **kwargs: Any) -> Any:
        version = created(self, name, *args, **kwargs)
        # What a tracking server's handler does as it creates a version from a logged model (its version an int).
        self._tracking_client.store.set_model_versions_tags(name, int(version.version), kwargs["model_id"])
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", as_a_server)
    for name in ("seed", "seed", "seed-b"):  # registered twice under one name, a checkpoint has one version of it
        tracking.register(run.info.run_id, name, checkpoint="latest")
    listed = json.loads(client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"])
    assert [(entry["name"], str(entry["version"])) for entry in listed] == [("seed", "1"), ("seed-b", "1")]  # was 4

    # A tag edited into no list fails no registration once its version exists (it was a JSON traceback).
    monkeypatch.setattr(MlflowClient, "create_model_version", created)
    client.set_logged_model_tags(logged.model_id, {"mlflow.modelVersions": "edited"})
    version = tracking.register(run.info.run_id, "other", checkpoint="latest")
    assert json.loads(client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "other", "version": version.version}
    ]


def test_a_name_holding_both_quotes_registers_and_is_told_apart_from_names_like_it(s3_experiment: str) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    run_id, name, client = run.info.run_id, 'it\'s "v2"', MlflowClient()
    # Whole models under a name that a LIKE filter with "_" for the quote matches too: not this name's versions.
    client.create_registered_model('it_s "v2"')
    client.create_model_version('it_s "v2"', source=f"runs:/{run_id}/model", run_id=run_id)
    args = ["register", run_id, name, "--checkpoint", "latest"]
    result = CliRunner().invoke(main, [*args, "--alias", "champion"])
    assert result.exit_code == 0, result.output  # was "Invalid clause(s) in filter string ... the tracking server"
    assert tracking.load(f"models:/{name}@champion").epoch == 1
    # The name's own whole-model versions are still found.
    client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "holds version 2 that is no checkpoint" in refused.stderr, refused.output


@pytest.mark.parametrize("failing", ["set_registered_model_alias", "set_logged_model_tags", "create_model_version"])
def test_a_retried_registration_reuses_the_version_it_made_before_failing(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
        tracking.log_checkpoint(Model(6), epoch=2)
    run_id, client = run.info.run_id, MlflowClient()
    tracking.register(run_id, "seed", checkpoint=2, alias="champion")
    original = getattr(MlflowClient, failing)

    def fails_once(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(MlflowClient, failing, original)
        # The step after creating the version fails; create_model_version's answer is lost after the server made it.
        if failing == "create_model_version":
            original(self, *args, **kwargs)
        raise mlflow.exceptions.MlflowException(f"{failing} timed out")

    monkeypatch.setattr(MlflowClient, failing, fails_once)
    with pytest.raises(tracking.StorageError) as failed:
        tracking.register(run_id, "seed", checkpoint=1, alias="champion")
    assert "retry" in str(failed.value)
    if failing != "create_model_version":  # the version exists, and the error says the retry reuses it
        assert "version 2 of 'seed' was made" in str(failed.value), failed.value
    result = CliRunner().invoke(main, ["register", run_id, "seed", "--checkpoint", "1", "--alias", "champion"])
    assert result.exit_code == 0, result.output
    assert "seed version 2 already holds" in result.output, result.output  # was: registered seed version 3
    # Where the alias was set before the failure, it moved nowhere now.
    assert ("alias champion named version 1 before" in result.output) == (failing != "set_logged_model_tags")
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'seed'")) == [1, 2]
    assert str(client.get_model_version_by_alias("seed", "champion").version) == "2"
    assert tracking.load("models:/seed@champion").epoch == 1
    (model_1,) = [c.model_id for c in tracking.list_checkpoints(run_id) if c.epoch == 1]
    listed = json.loads(client.get_logged_model(str(model_1)).tags["mlflow.modelVersions"])
    assert [(entry["name"], str(entry["version"])) for entry in listed] == [("seed", "2")]
    # Registered again, the same checkpoint names the same version; the alias moves back to it from another.
    tracking.register(run_id, "seed", checkpoint=2, alias="champion")
    again = CliRunner().invoke(main, ["register", run_id, "seed", "--checkpoint", "1", "--alias", "champion", "--json"])
    assert again.exit_code == 0, again.output
    printed = json.loads(again.stdout)
    assert (str(printed["version"]), printed["reused"], printed["alias_moved_from"]) == ("2", True, "1")
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'seed'")) == [1, 2]


def test_a_checkpoint_registered_by_the_uis_button_is_reused_and_tagged(s3_experiment: str) -> None:
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(Model(6), epoch=1)
    client = MlflowClient()
    client.create_registered_model("seed")
    # The UI's Register model button: its source the logged model's artifact location, no tags.
    location = client.get_logged_model(logged.model_id).artifact_location
    client.create_model_version("seed", source=location, run_id=run.info.run_id)
    version = tracking.register(run.info.run_id, "seed", checkpoint=1, alias="champion")
    assert str(version.version) == "1" and version.tags[layout.VERSION_TAG_CHECKPOINT] == "checkpoint-epoch-0001"
    assert client.get_model_version("seed", "1").tags == version.tags
    assert len(client.search_model_versions("name = 'seed'")) == 1
    assert tracking.load("models:/seed@champion").epoch == 1


def test_two_registrations_of_one_checkpoint_at_once_make_one_version(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run() as run:
        tracking.log_checkpoint(Model(6), epoch=1)
    run_id, client = run.info.run_id, MlflowClient()
    # Both calls have searched for a version of the checkpoint, and found none, before either creates one.
    both_searched = threading.Barrier(2, timeout=30)
    create = MlflowClient.create_registered_model

    def after_both_searched(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        both_searched.wait()
        return create(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_registered_model", after_both_searched)
    with ThreadPoolExecutor(max_workers=2) as pool:
        calls = [pool.submit(tracking.register, run_id, "seed", checkpoint=1, alias="champion") for _ in range(2)]
        versions = [str(call.result(timeout=60).version) for call in calls]
    assert versions == ["1", "1"]  # was: one caller got version 1, the other version 2, both of the checkpoint
    assert [str(v.version) for v in client.search_model_versions("name = 'seed'")] == ["1"]
    assert str(client.get_model_version_by_alias("seed", "champion").version) == "1"
    assert tracking.load("models:/seed@champion").epoch == 1


def test_the_newer_of_two_versions_of_one_checkpoint_deletes_itself_and_its_link(s3_experiment: str) -> None:
    from tracking.registry import _settle

    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(Model(6), epoch=1)
    client, model_id = MlflowClient(), str(logged.model_id)
    client.create_registered_model("seed")
    made = [
        client.create_model_version("seed", source=f"models:/{model_id}", run_id=run.info.run_id, model_id=model_id)
        for _ in range(2)
    ]
    # As a tracking server lists each version it creates in the logged model's tag (and keeps it once deleted).
    listed = [{"name": "seed", "version": int(v.version)} for v in made]
    client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(listed)})

    assert str(_settle(client, "seed", model_id, made[0]).version) == "1"  # the older keeps itself
    assert str(_settle(client, "seed", model_id, made[1]).version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name = 'seed'")] == ["1"]
    tag = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(entry["name"], str(entry["version"])) for entry in tag] == [("seed", "1")]


def test_a_registration_whose_link_another_overwrites_links_its_version_again(
    s3_experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two registrations of one checkpoint under two names at once both read the logged model's
    mlflow.modelVersions tag, then both write it: the later write dropped the other's version from it."""
    with mlflow.start_run() as run:
        logged = tracking.log_checkpoint(Model(6), epoch=1)
    client, model_id = MlflowClient(), str(logged.model_id)
    stale = json.dumps([{"name": "other", "version": 1}])  # what the other registration read, plus its own
    write = MlflowClient.set_logged_model_tags
    overwritten: list[str] = []

    def then_the_other_writes(self: MlflowClient, model: str, tags: dict[str, str]) -> None:
        write(self, model, tags)
        if "mlflow.modelVersions" in tags and not overwritten:
            overwritten.append(tags["mlflow.modelVersions"])
            write(self, model, {"mlflow.modelVersions": stale})

    monkeypatch.setattr(MlflowClient, "set_logged_model_tags", then_the_other_writes)
    version = tracking.register(run.info.run_id, "seed", checkpoint="latest")

    assert overwritten  # the other registration's write did land after ours
    tag = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert sorted((entry["name"], str(entry["version"])) for entry in tag) == [
        ("other", "1"),
        ("seed", str(version.version)),
    ]
