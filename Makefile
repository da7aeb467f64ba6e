# Two commands for a newcomer: `make train` and `make test` (`make test-all`: every tier, as CI).
# Both create .venv and install into it first (the CPU build of torch, unless TORCH_SPEC says otherwise).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PIP_INDEX   ?=
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.torch-spec
STACK_ENV   := .tracking/stack.env
TRAIN_ARGS  ?= --epochs 10 --checkpoint-every 2 --keep-last 3 --keep-best 1
# dclint (a Compose-spec validator and linter) comes from npm, at this exact version.
DCLINT      ?= npx --yes dclint@3.1.0
TEST_WORKERS ?= 2
WHEELHOUSE  ?= .wheelhouse

.PHONY: FORCE install browser-deps train test test-all test-unit test-integration test-gpu wheelhouse lint lint-docker bench stack-up stack-down stack-status clean

install: $(STAMP)

# torch goes in first and on its own: installed through the project's dependencies it would
# resolve to the multi-GB CUDA build. Re-run when pyproject.toml, TORCH_SPEC or PIP_INDEX changes.
$(STAMP): pyproject.toml $(TORCH_STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(PIP_INDEX),--index-url $(PIP_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Rewritten (so newer than the install) only when the torch asked for differs from the one installed.
$(TORCH_STAMP): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC) $(PIP_INDEX)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(PIP_INDEX)' > $@

# Headless chromium + its driver for the browser test of the MLflow UI (Debian packages; needs
# root). `make test` and `make test-all` run it first: it installs them only when they are missing.
browser-deps:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)

# Trains the seed model and logs to MLflow. With no MLFLOW_TRACKING_URI set, it starts the
# local stack (SeaweedFS + MLflow server) and uses it.
train: install
	@if [ -z "$$MLFLOW_TRACKING_URI" ]; then \
		$(BIN)/tracking stack up --data-dir .tracking && . ./$(STACK_ENV) && $(BIN)/python -m pipelines.train $(TRAIN_ARGS); \
	else \
		$(BIN)/python -m pipelines.train $(TRAIN_ARGS); \
	fi

# README's test command: the unit tier (moto S3, sqlite) plus one real-stack path per promise
# (tests marked smoke: log, load by run ID, resume, logged models, the UI) on one SeaweedFS +
# MLflow server stack. The browser test drives Debian's chromium: installed first when missing.
# TEST_WORKERS pytest-xdist processes share the files (each file's tests in one of them, each
# with its own stack when its files need one): much of the suite waits on subprocesses and
# servers, so two use two cores where one process used one and a half. TEST_WORKERS=0: one process.
test: install browser-deps
	$(BIN)/python -m pytest tests -m "unit or smoke" -n $(TEST_WORKERS) --dist loadfile

# Every tier: unit, integration (sqlite, PostgreSQL, proxied stacks; compose server; browser),
# reliability and distributed. What .ci/run runs, on TEST_WORKERS workers as `make test`: about 20
# minutes on two instead of about 35 in one process. The files' order then changes from run to run, so
# no test may depend on what an earlier file left in its process (tracking.testing puts back what
# MLflow leaves).
test-all: install browser-deps
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

# The GPU tier on a CUDA machine (install a CUDA torch build: TORCH_SPEC / PIP_INDEX). Where CUDA is
# absent its tests are skipped, each with the reason.
test-gpu: install
	$(BIN)/python -m pytest -ra tests/gpu

# The wheels the GPU machine (README, "On a GPU") lacks, for its Python 3.12 on x86-64 Linux, at the
# versions installed here (tests/gpu/wheelhouse.txt says which and why); tests/gpu/device_check.sh
# installs them there. pip matches each manylinux tag exactly, hence the list; none newer than 2.28,
# the glibc any CUDA 13 image has.
wheelhouse: install
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
		--dest $(WHEELHOUSE) $$($(BIN)/python -m tests.gpu.wheelhouse pins)
	$(BIN)/python -m tests.gpu.wheelhouse check $(WHEELHOUSE)

lint: install
	$(BIN)/ruff check tracking pipelines benchmarks tests
	$(BIN)/ruff format --check tracking pipelines benchmarks tests
	$(BIN)/mypy tracking pipelines

# docker/: hadolint (dev extras) on both Dockerfiles, dclint (npm; needs node) on compose.yaml.
# Clean means no finding at all: hadolint fails on any, dclint is told to fail on warnings too.
lint-docker: install
	$(BIN)/hadolint docker/mlflow.Dockerfile docker/trainer.Dockerfile
	$(DCLINT) --max-warnings 0 docker/compose.yaml

# The GPU figures follow the CPU ones; without CUDA that part says it skipped.
bench: install
	$(BIN)/python -m benchmarks.checkpoint_io
	$(BIN)/python -m benchmarks.checkpoint_io.gpu

stack-up: install
	$(BIN)/tracking stack up

stack-down: install
	$(BIN)/tracking stack down

stack-status: install
	$(BIN)/tracking stack status

clean:
	-$(BIN)/tracking stack down
	rm -rf $(VENV) .tracking .pytest_cache .mypy_cache .ruff_cache
