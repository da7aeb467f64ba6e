"""MLflow's autologging configuration: copied before a test, put back after it by :mod:`tracking.testing`.

Never imported by the library. Neither is mlflow here: while it is not imported, nothing is configured.
"""

from __future__ import annotations

import sys

# Each autologging integration's config as MLflow records it, by name ("mlflow" for mlflow.autolog()).
AutologgingConfigs = dict[str, dict[str, object]]


def autologging_configs() -> AutologgingConfigs:
    """MLflow's autologging configs, copied; none while mlflow is not imported (nothing is configured)."""
    if "mlflow.utils.autologging_utils" not in sys.modules:
        return {}  # importing mlflow to read them would cost each test seconds
    from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS

    return {name: dict(config) for name, config in AUTOLOGGING_INTEGRATIONS.items()}


def restore_autologging(before: AutologgingConfigs, nodeid: str) -> list[str]:
    """Call the autolog() of each integration whose config the test changed with its config from before.

    What could not be put back, a sentence an integration naming the test ``nodeid``; nothing when all was.
    MLflow's own evaluation puts autologging back the same way (mlflow.models.evaluation.utils.trace).
    """
    if "mlflow.utils.autologging_utils" not in sys.modules:
        return []
    from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS

    # mlflow.autolog() first: it also waits for the libraries it covers to be imported, and undoing it
    # replaces those waiting calls; a later test importing Lightning would turn its autologging on.
    problems = _restore_integration("mlflow", before, nodeid)
    for name in list(AUTOLOGGING_INTEGRATIONS):
        problems += _restore_integration(name, before, nodeid)
    return problems


def _restore_integration(name: str, configs: AutologgingConfigs, nodeid: str) -> list[str]:
    """Put integration ``name`` back to its config in ``configs``; what went wrong, in a sentence, or nothing."""
    import inspect

    import mlflow
    from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS, get_autolog_function

    # Absent before: its flavor module was imported during the test, which records it as {} (never configured).
    config = configs.get(name, {})
    if AUTOLOGGING_INTEGRATIONS.get(name, {}) == config:
        return []
    module = "mlflow" if name == "mlflow" else f"mlflow.{name}"
    try:
        autolog = mlflow.autolog if name == "mlflow" else get_autolog_function(name)
        if autolog is None:
            raise LookupError(f"{module} has no autolog()")
        if config and not config.get("disable", False):
            accepted = inspect.signature(autolog).parameters  # not "globally_configured", MLflow's own key
            autolog(**{key: value for key, value in config.items() if key in accepted})
        else:
            autolog(disable=True)
    except Exception as exc:
        return [
            f"{nodeid} changed MLflow's {name} autologging and tracking.testing could not put it back as it was "
            f"before the test ({type(exc).__name__}: {exc}): later tests would autolog with it. Undo it at the end "
            f"of the test, e.g. {module}.autolog(disable=True)."
        ]
    finally:
        AUTOLOGGING_INTEGRATIONS[name] = config  # MLflow's patches read it on every call: off even if not reverted
    return []
