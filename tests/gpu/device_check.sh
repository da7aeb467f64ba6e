#!/usr/bin/env bash
# The GPU tier and the GPU benchmark on a CUDA machine, in one go, with what that machine lacks
# installed from the wheelhouse (`make wheelhouse`, here; README, "On a GPU"). From the repo root:
#
#     bash tests/gpu/device_check.sh
#
# It installs .wheelhouse/*.whl into $SITE unless $PYTHON already imports mlflow, boto3 and moto,
# puts $SITE and the repo on PYTHONPATH (no editable install there), writes the versions and the
# GPUs, runs `pytest tests/gpu` and `python -m benchmarks.checkpoint_io.gpu`, each under its own
# time limit (the whole script ends within 8.5 minutes), and leaves its files in $OUT (at most
# 6: environment.txt, tests.log, tests.xml, bench.log, checkpoint_io_gpu.json, summary.txt). The
# last line it prints is the summary; it exits 0 only when both steps passed.
set -u -o pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-test-output/gpu}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
SITE=${SITE:-/tmp/site}
INSTALL_LIMIT=${INSTALL_LIMIT:-60}
TESTS_LIMIT=${TESTS_LIMIT:-180}
TEST_LIMIT=${TEST_LIMIT:-120}
BENCH_LIMIT=${BENCH_LIMIT:-240}
BENCH_ARGS=${BENCH_ARGS:-}
RESULTS=benchmarks/results/checkpoint_io_gpu.json

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# MLflow's download bars would fill the benchmark's log (it downloads from a file:// store too).
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
began=$SECONDS

# --- what the machine lacks ---------------------------------------------------------------------
installed="already importable"
if ! "$PYTHON" -c "import mlflow, boto3, moto" 2>/dev/null; then
    if ! compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
        echo "gpu-check: $PYTHON cannot import mlflow, boto3, moto and $WHEELHOUSE holds no wheels:" \
            "run \`make wheelhouse\` where pip can download, and carry $WHEELHOUSE here." | tee "$OUT/summary.txt"
        exit 2
    fi
    # --no-deps: the wheelhouse is the whole closure of what is missing; the rest is the image's.
    if ! timeout -k 5 "$INSTALL_LIMIT" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "$WHEELHOUSE"/*.whl; then
        echo "gpu-check: installing $WHEELHOUSE into $SITE failed (above); run \`make wheelhouse\` again." \
            | tee "$OUT/summary.txt"
        exit 2
    fi
    installed="$(ls "$WHEELHOUSE"/*.whl | wc -l) wheels from $WHEELHOUSE into $SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- what it runs on ----------------------------------------------------------------------------
{
    echo "python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)'))"
    echo "wheelhouse: $installed"
    "$PYTHON" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version

import torch

cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {cuda}")
if cuda:
    print(f"device 0: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible")
for name in ("mlflow-skinny", "mlflow", "boto3", "moto", "sqlalchemy", "lightning", "transformers", "accelerate",
             "numpy", "pytest", "pytest-timeout"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name} (not installed)")
EOF
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1; else echo "nvidia-smi: not here"; fi
    echo "--- pip check (the image's own conflicts included)"
    "$PYTHON" -m pip check 2>&1 | head -20
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# --- the GPU tier -------------------------------------------------------------------------------
per_test=()
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout "$TEST_LIMIT")
fi
timeout -k 10 "$TESTS_LIMIT" "$PYTHON" -m pytest -ra -p no:cacheprovider "${per_test[@]}" \
    --junitxml "$OUT/tests.xml" tests/gpu 2>&1 | tee "$OUT/tests.log"
tests_rc=$?
tests_line=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$OUT/tests.log" | tail -1 \
    | tr -d '=' | xargs)
tests_line=${tests_line:-no summary}
[ "$tests_rc" -ge 124 ] && tests_line="stopped after ${TESTS_LIMIT}s ($tests_line)"

# --- the GPU benchmark --------------------------------------------------------------------------
rm -f "$RESULTS"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout -k 10 "$BENCH_LIMIT" "$PYTHON" -m benchmarks.checkpoint_io.gpu $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
bench_rc=$?
if [ -f "$RESULTS" ]; then
    cp "$RESULTS" "$OUT/"
    bench_line="figures in $(basename "$RESULTS")"
elif grep -q "^GPU benchmark skipped" "$OUT/bench.log"; then
    bench_line="skipped (no CUDA)"
elif [ "$bench_rc" -ge 124 ]; then
    bench_line="stopped after ${BENCH_LIMIT}s"
else
    bench_line="failed (exit $bench_rc)"
fi

device=$(nvidia-smi -L 2>/dev/null | head -1 | cut -d'(' -f1)
summary="gpu-check: ${device:-no GPU}; tests/gpu: ${tests_line} (exit $tests_rc); benchmark: $bench_line; $((SECONDS - began)) s; files in $OUT"
echo "$summary" > "$OUT/summary.txt"
echo "$summary"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
