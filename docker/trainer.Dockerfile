# The pipelines and the tracking library. TORCH_INDEX picks the torch build:
#   CPU (default) https://download.pytorch.org/whl/cpu, or e.g. .../whl/cu124 for CUDA 12.4.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
WORKDIR /app
# torch first, from the chosen index, so the project's own `torch` requirement is already met.
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
COPY pyproject.toml README.md ./
COPY tracking ./tracking
COPY pipelines ./pipelines
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir .
CMD ["python", "-m", "pipelines.train"]
