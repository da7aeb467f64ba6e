"""An ``--override`` of a resumed run's params, and how it is recorded.

A run's params cannot change, so an override on RUN_ID itself is kept in tags: ``tracking.override.<param>``
holds the value its later resumes go on with, and ``tracking.overrides`` tells what changed from where. A
``--new-run`` child records the values given as its params.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlflow.entities import Run

TAG_OVERRIDES = "tracking.overrides"
# tracking.override.lr = "0.5": the value of param lr since an --override on the run itself.
TAG_OVERRIDE_PREFIX = "tracking.override."


def current_params(run: Run | None) -> dict[str, str]:
    """The params ``run`` last trained with: its recorded ones, with the values --override gave it since."""
    if run is None:
        return {}
    params = dict(run.data.params)
    for tag, value in run.data.tags.items():
        name = tag.removeprefix(TAG_OVERRIDE_PREFIX)
        if name != tag and name in params:
            params[name] = value
    return params


def override_tags(where: str, changed: Mapping[str, tuple[str, str]], origin: Run, new_run: bool) -> dict[str, str]:
    """The tags that record the params this resume changes (name -> (current, given)) from ``where`` (``"epoch 4"``,
    ``"step 120"``) on: the overrides tag, appended to on RUN_ID itself, and there each param's value from now
    on, which its later resumes take (:func:`current_params`). A ``--new-run`` child records them as its params."""
    if not changed:
        return {}
    note = f"from {where}: {listed(changed)}"
    earlier = None if new_run else origin.data.tags.get(TAG_OVERRIDES)
    tags = {TAG_OVERRIDES: f"{earlier}; {note}" if earlier else note}
    if not new_run:
        tags.update({TAG_OVERRIDE_PREFIX + name: given for name, (_, given) in changed.items()})
    return tags


def listed(changed: Mapping[str, tuple[str, str]]) -> str:
    return ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
