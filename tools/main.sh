#!/usr/bin/env bash
# The README's main job: set up (or reuse) the environment, then run the whole
# pipeline on the built-in synthetic ISIC 2019 data (see tools/main_job.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
python tools/main_job.py "$@"
