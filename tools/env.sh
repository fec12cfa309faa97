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
STAMP="$VENV/.ssdkd-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[env] installing requirements (first run or requirements changed)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
    echo "$WANT" > "$STAMP"
else
    echo "[env] reusing $VENV (requirements unchanged)"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export MPLBACKEND="${MPLBACKEND:-Agg}"
