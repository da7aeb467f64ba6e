"""What a user sees in the real MLflow UI of a run a pipeline logged (headless chromium): the training
pipeline's hand-written loop, and the Lightning and Hugging Face Trainer pipelines, whose checkpoints
must show exactly like its.

The pipeline runs against the session sqlite stack; the test opens the links it prints and the pages
they lead to, checks visible texts with explicit waits (the UI is a React app that renders after
load), and saves a screenshot of every checked page under ``test-output/ui/`` (CI keeps them).

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``; ``.ci/run`` calls it).
Without them the test fails and says so: it never skips.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tracking.localstack import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "ui"
WAIT_S = 60
EPOCHS = 3
CLASSIC = "?workflowType=machine_learning"
# The sidebar of the training view, and entries only the GenAI view's sidebar has.
TRAINING_NAV = {"Model training", "Runs", "Models", "Model registry"}
GENAI_NAV = {"Training runs", "Observability", "Evaluation runs", "Sessions", "Judges"}
CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]


def _browser_binaries() -> tuple[str, str]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        missing = [name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path]
        pytest.fail(
            f"the MLflow UI browser test needs {' and '.join(missing)} on PATH: run `make browser-deps` "
            "(apt-get install chromium chromium-driver) first",
            pytrace=False,
        )
    return chromium, chromedriver


class Page:
    """A headless chromium that fails the test with a screenshot when what it waits for never shows."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots

    def shot(self, step: str) -> Path:
        path = self.shots / f"{step}.png"
        self.driver.save_screenshot(str(path))
        return path

    def fail(self, step: str, message: str) -> None:
        path = self.shot(f"{step}-FAILED")
        path.with_suffix(".html").write_text(self.driver.page_source)
        pytest.fail(f"{step}: {message} (at {self.driver.current_url}; screenshot {path})", pytrace=False)

    def lines(self) -> set[str]:
        """The page's visible text, one stripped line each (hidden and clipped text is not in it)."""
        from selenium.webdriver.common.by import By

        try:
            text = self.driver.find_element(By.TAG_NAME, "body").text
        except Exception:  # the page is between renders: nothing visible yet
            return set()
        return {line.strip() for line in text.splitlines() if line.strip()}

    def text(self) -> str:
        return "\n".join(sorted(self.lines()))

    def wait(self, step: str, what: str | Callable[[], str], found: Callable[[], Any]) -> Any:
        """Waits until ``found()`` is truthy and returns it; fails the test after WAIT_S seconds, saying
        ``what`` (or what ``what()`` says then) it waited for."""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def attempt(_: Any) -> Any:
            try:
                return found()
            except WebDriverException:  # stale or not yet rendered: try again
                return None

        try:
            return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.5).until(attempt)
        except TimeoutException:
            self.fail(step, f"waited {WAIT_S} s for {what if isinstance(what, str) else what()}")

    def wait_for_lines(self, step: str, *wanted: str) -> set[str]:
        def all_shown() -> set[str] | None:
            lines = self.lines()
            return lines if all(w in lines for w in wanted) else None

        def missing() -> str:
            lines = self.lines()
            return f"the lines {list(wanted)} (missing: {[w for w in wanted if w not in lines]})"

        lines: set[str] = self.wait(step, missing, all_shown)
        return lines

    def visible(self, xpath: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return [el for el in self.driver.find_elements(By.XPATH, xpath) if el.is_displayed()]

    def close_assistant(self) -> None:
        """Closes the MLflow Assistant side panel when it is open, so screenshots show the page's width."""
        for button in self.visible(
            "//*[normalize-space(text())='MLflow Assistant']/following::button[@aria-label='Close']"
        ):
            button.click()
            return


@contextmanager
def chromium(profile: Path, shots: Path) -> Iterator[Page]:
    """Headless chromium through the Debian chromedriver, with a fresh profile; quit on the way out."""
    chromium_bin, chromedriver = _browser_binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `make install` (it is in the dev extras)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_bin
    for arg in [*CHROME_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(chromedriver, log_output=str(profile.with_suffix(".log"))), options=options
    )
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield Page(driver, shots)
    finally:
        driver.quit()


@dataclass(frozen=True)
class Pipeline:
    """A pipeline's command, and how its checkpoints are numbered, measured and stored."""

    module: str
    first_epoch: int  # Lightning numbers epochs from 0, as in its own file names
    metric: str
    data_file: str

    @property
    def epochs(self) -> list[int]:
        return list(range(self.first_epoch, self.first_epoch + EPOCHS))

    @property
    def checkpoints(self) -> list[str]:
        return [f"checkpoint-epoch-{epoch:04d}" for epoch in self.epochs]


PIPELINES = {
    "train": Pipeline("pipelines.train", 1, "val_loss", "checkpoint.pt"),
    "lightning": Pipeline("pipelines.lightning_digits", 0, "val_loss", "checkpoint.pt"),
    "transformers": Pipeline("pipelines.hf_digits", 1, "eval_loss", "model.safetensors"),
}


@dataclass(frozen=True)
class Trained:
    """A run the training pipeline logged, and what the UI should show of it (from the tracking API)."""

    pipeline: Pipeline
    ui: str
    run_id: str
    experiment_id: str
    run_name: str
    checkpoints: dict[str, Any]  # name -> LoggedModel

    @property
    def run_link(self) -> str:
        return f"{self.ui}/#/experiments/{self.experiment_id}/runs/{self.run_id}{CLASSIC}"

    @property
    def models_link(self) -> str:
        return f"{self.ui}/#/experiments/{self.experiment_id}/models{CLASSIC}"

    def model_page(self, model_id: str, tab: str = "") -> str:
        return f"{self.ui}/#/experiments/{self.experiment_id}/models/{model_id}{tab}{CLASSIC}"


def train(stack: LocalStack, pipeline: Pipeline) -> Trained:
    """Runs ``python -m <pipeline>`` as a user would, with the stack's environment."""
    trained = subprocess.run(
        [sys.executable, "-m", pipeline.module, "--epochs", str(EPOCHS)],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    found = re.search(r"MLflow run ([0-9a-f]{32}) \(experiment (\d+)\)", trained.stdout)
    assert found, trained.stdout
    run_id, experiment_id = found.groups()
    client = MlflowClient(stack.tracking_uri)
    logged = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    run = Trained(
        pipeline=pipeline,
        ui=stack.tracking_uri,
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=client.get_run(run_id).info.run_name,
        checkpoints={m.name: m for m in logged if m.model_type == "pytorch-checkpoint"},
    )
    assert sorted(run.checkpoints) == pipeline.checkpoints
    # The pipeline prints both links with CLASSIC (MLflow's own "View run" line lacks it).
    printed = re.findall(r"https?://\S+", trained.stdout)
    assert run.run_link in printed and run.models_link in printed, trained.stdout
    return run


@pytest.mark.smoke(pipeline="train")  # make test: the UI promise; make test-all: each framework's too
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_mlflow_ui_shows_the_pipeline_run_its_checkpoints_and_manifests(
    pipeline: str,
    tmp_path: Path,
    stack_sqlite: LocalStack,
    use_stack: Callable[[LocalStack], LocalStack],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _browser_binaries()  # fail fast, before training, when the browser is missing
    monkeypatch.setenv("TRACKING_EXPERIMENT", f"ui-{uuid.uuid4().hex[:8]}")
    run = train(use_stack(stack_sqlite), PIPELINES[pipeline])
    shots = SHOTS / pipeline
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with chromium(tmp_path / "chromium-profile", shots) as page:
        check_run_page(page, run)
        check_description(page, run)
        check_checkpoints(page, run)
        check_manifest_preview(page, run)


def check_run_page(page: Page, run: Trained) -> None:
    """(a) The printed run link opens the run in the classic training view, not the GenAI one, and
    the run's Logged models section lists its checkpoints."""
    step = "01-run-overview"
    page.driver.get(run.run_link)
    lines = page.wait_for_lines(step, "Overview", "Model metrics", "Artifacts", "Description", "Run ID", run.run_id)
    page.close_assistant()
    if not TRAINING_NAV.issubset(lines) or lines & GENAI_NAV:
        page.fail(
            step,
            f"expected the training view's sidebar {sorted(TRAINING_NAV)} and none of the GenAI view's "
            f"{sorted(GENAI_NAV)}; missing {sorted(TRAINING_NAV - lines)}, present {sorted(lines & GENAI_NAV)}",
        )
    if run.run_id not in page.driver.current_url or CLASSIC not in page.driver.current_url:
        page.fail(step, f"the UI left the run page or the training view (expected {run.run_link})")
    # The run's "Logged models" section lists every checkpoint (each is linked to the run as an output).
    names = run.pipeline.checkpoints
    page.wait(step, f"the run's logged models {names}", lambda: all(name in page.text() for name in names) or None)
    page.shot(step)


def check_description(page: Page, run: Trained) -> None:
    """(b) The run's description is rendered markdown: the checkpoint table and the lines that load the run."""
    step = "02-run-description"
    load_line = f'loaded = tracking.load("{run.run_id}")'

    def load_code() -> list[Any]:
        for toggle in page.visible("//*[normalize-space(text())='Show more']"):  # a long description is folded
            toggle.click()
        return [pre for pre in page.visible("//pre") if load_line in pre.text]

    page.wait(step, f"a rendered code block with {load_line!r}", load_code)
    last = run.pipeline.epochs[-1]
    latest = run.checkpoints[run.pipeline.checkpoints[-1]]
    page.wait(
        step,
        f"the description's checkpoint table naming {latest.model_id} (epoch {last}) latest",
        lambda: [
            row
            for row in page.visible("//table//tr")
            if row.text.startswith(f"{last} ") and latest.model_id in row.text and "latest" in row.text
        ],
    )
    if "```" in page.text():
        page.fail(step, "the description shows raw markdown (```), not rendered")
    page.shot(step)


def check_checkpoints(page: Page, run: Trained) -> None:
    """(c) The experiment's Models tab (the printed link) lists every checkpoint by name, and each
    checkpoint's page shows its validation loss as logged against the model, and the register button."""
    step = "03-experiment-models"
    names, metric = run.pipeline.checkpoints, run.pipeline.metric
    page.driver.get(run.models_link)
    page.wait_for_lines(step, "Models", *names)
    page.shot(step)
    for name in names:
        links = page.visible(f"//a[normalize-space()='{name}']")
        href = links[0].get_attribute("href") if links else ""
        model_id = run.checkpoints[name].model_id
        if not href or not href.endswith(f"/models/{model_id}"):
            page.fail(step, f"{name} does not link to its logged model {model_id} (href {href!r})")

    for number, name in enumerate(names, start=1):
        step = f"04-{number}-{name}"
        model = run.checkpoints[name]
        val_loss = {logged.key: logged.value for logged in model.metrics or []}[metric]
        page.driver.get(run.model_page(model.model_id))
        page.wait_for_lines(step, name, "Ready", "Register model", "Source run", run.run_name, metric)
        rows = page.wait(
            step,
            f"the {metric} row of the model's metrics table",
            lambda: page.visible(f"//*[@role='row'][./*[@role='cell'][1][normalize-space()='{metric}']]"),
        )
        shown = rows[0].find_elements("xpath", "./*[@role='cell']")[-1].text.strip()
        try:
            matches = abs(float(shown) - val_loss) <= 1e-9 * max(1.0, abs(val_loss))
        except ValueError:
            matches = False
        if not matches:
            page.fail(step, f"{name} shows {metric} {shown!r}, logged {val_loss!r}")
        page.shot(step)


def check_manifest_preview(page: Page, run: Trained) -> None:
    """(d) The latest checkpoint's manifest.json previews as JSON in its logged model's Artifacts tab."""
    step = "05-manifest-json"
    last = run.pipeline.epochs[-1]
    latest = run.checkpoints[run.pipeline.checkpoints[-1]]
    page.driver.get(run.model_page(latest.model_id, "/artifacts"))
    page.wait_for_lines(step, run.pipeline.data_file, "manifest.json")
    entry = page.wait(step, "manifest.json in the file tree", lambda: page.visible("//*[text()='manifest.json']"))[0]
    entry.click()
    page.wait(
        step,
        f'the preview of manifest.json with "sha256" and "epoch": {last}',
        lambda: re.search(r'"sha256": "[0-9a-f]{64}"', page.text()) and f'"epoch": {last},' in page.text(),
    )
    path = f"models/{latest.model_id}/artifacts/manifest.json"
    if not any(line.startswith("Path: s3://") and line.endswith(path) for line in page.lines()):
        page.fail(step, f"the preview does not name its file's S3 path ending in {path}")
    page.shot(step)
