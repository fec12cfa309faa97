#!/usr/bin/env bash
# The README's test command: set up (or reuse) the environment, then run the suite.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -m slow`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
python -m pytest "$@"
