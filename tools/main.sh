#!/usr/bin/env bash
# The README's main job: set up (or reuse) the environment, then run the whole
# pipeline on the built-in synthetic ISIC 2019 data (see tools/main_job.py).
# Options go to tools/main_job.py: --fast (a few minutes, 3 seeds), --seeds N, --subprocess,
# --out DIR, --data DIR, --device cpu|cuda|auto.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
# exec: the shell reads nothing more, so editing this file during a run is harmless
exec python tools/main_job.py "$@"
