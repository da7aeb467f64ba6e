"""``tracking.testing`` puts MLflow's autologging back as it was before each test of a user's suite.

Two child pytest sessions with ``tracking.testing`` as their only plugin: in one, a test turns autologging on
and the next finds it off, a Lightning imported after ``mlflow.autolog()`` included; in the other, the session
turned scikit-learn's autologging on in its conftest.py, and a test that turns it off or turns on MLflow's for
every library leaves it on, as configured, for the next.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.user_suite import ONLY_THE_PLUGIN, run_user_suite

FIT = """
import mlflow
from mlflow.utils.autologging_utils import autologging_is_disabled, get_autologging_config
from sklearn.linear_model import LinearRegression


def fit_params() -> dict[str, str]:
    \"\"\"The params autologging logged for a scikit-learn fit in a run of its own: none when it is off.\"\"\"
    with mlflow.start_run() as run:
        LinearRegression().fit([[0.0], [1.0], [2.0]], [0.0, 1.0, 2.0])
    return mlflow.get_run(run.info.run_id).data.params
"""

TURNED_ON_IN_A_TEST = (
    FIT
    + """

def test_turns_autologging_on(tracking_store: str) -> None:
    mlflow.autolog(log_models=False, log_datasets=False, silent=True)  # it waits for Lightning to be imported
    assert "fit_intercept" in fit_params()


def test_then_nothing_is_autologged(tracking_store: str) -> None:
    import lightning  # noqa: F401

    assert fit_params() == {}
    assert [name for name in ("mlflow", "sklearn", "pytorch") if not autologging_is_disabled(name)] == []


def test_turns_pytorch_autologging_on(tracking_store: str) -> None:
    mlflow.pytorch.autolog(log_models=False, silent=True)
    assert not autologging_is_disabled("pytorch")


def test_then_it_is_off(tracking_store: str) -> None:
    assert autologging_is_disabled("pytorch")
"""
)

TURNED_ON_IN_CONFTEST = (
    FIT
    + """

def test_turns_the_sessions_autologging_off(tracking_store: str) -> None:
    mlflow.sklearn.autolog(disable=True)
    assert fit_params() == {}


def test_then_it_is_on_again_as_the_session_configured_it(tracking_store: str) -> None:
    assert "fit_intercept" in fit_params()
    assert get_autologging_config("sklearn", "log_models") is False


def test_turns_autologging_on_for_every_library(tracking_store: str) -> None:
    mlflow.autolog(silent=True)


def test_then_only_the_sessions_own_is_on(tracking_store: str) -> None:
    assert autologging_is_disabled("mlflow")
    assert "fit_intercept" in fit_params()
    assert get_autologging_config("sklearn", "log_models") is False
"""
)


def _assert_all_passed(outcomes: dict[str, str], expected: int) -> None:
    failed = "\n\n".join(f"{name}: {outcome}" for name, outcome in outcomes.items() if outcome != "passed")
    assert len(outcomes) == expected and not failed, failed or outcomes


def test_autologging_a_test_turns_on_is_off_for_the_next(tmp_path: Path) -> None:
    outcomes, _ = run_user_suite(tmp_path, {"test_training.py": TURNED_ON_IN_A_TEST})
    _assert_all_passed(outcomes, 4)


# A second child session (about 10 s): make test-all runs it.
@pytest.mark.slow
def test_autologging_the_session_turned_on_stays_as_configured(tmp_path: Path) -> None:
    conftest = (
        f"{ONLY_THE_PLUGIN}\nimport mlflow\n\n"
        "mlflow.sklearn.autolog(log_models=False, log_datasets=False, silent=True)  # for the whole session\n"
    )
    outcomes, _ = run_user_suite(tmp_path, {"test_training.py": TURNED_ON_IN_CONFTEST}, conftest)
    _assert_all_passed(outcomes, 4)
