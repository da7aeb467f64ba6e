# The pipelines and the tracking library, run as an unprivileged user. Build context: the repository
# root. TORCH_INDEX picks the torch build: CPU (default), or e.g.
# https://download.pytorch.org/whl/cu124 for CUDA 12.4; the version is the one constraints.txt pins.
FROM python:3.11.14-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/trainer
COPY docker/constraints.txt ./
# torch alone from its index (only its own wheel: --no-deps), so nothing else is ever fetched from
# there; its dependencies come from PyPI with the project's, all at the pinned versions. setuptools
# builds the project without an isolated (unpinned) build environment.
RUN pip install --no-cache-dir -c constraints.txt setuptools \
    && pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX}" -c constraints.txt torch
COPY pyproject.toml README.md ./
COPY tracking ./tracking
COPY pipelines ./pipelines
RUN pip install --no-cache-dir --no-build-isolation -c constraints.txt . \
    && useradd --system --user-group --uid 10001 --create-home --home-dir /home/trainer trainer

# numeric, so a runtime that enforces runAsNonRoot can verify it: the trainer user created above
USER 10001:10001
WORKDIR /home/trainer
CMD ["python", "-m", "pipelines.train"]
