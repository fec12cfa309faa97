#!/usr/bin/env bash
# The README's test command: set up (or reuse) the environment, then run the suite.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -m slow`).
#
# Without arguments (what CI's .ci/run runs) a second pass follows: the tests marked
# `numeric` (they compare numbers that come out of PyTorch's CPU kernels) again with
# ATEN_CPU_CAPABILITY=default, i.e. ATen's generic kernels instead of the AVX2/AVX512 ones
# this CPU would pick. Kernels reorder float sums (and draw torch.randn differently), so a
# tolerance that only holds for one CPU's kernels fails here too, not only on a CI machine
# with another CPU (issue #18). About 2 minutes on 2 cores. The script fails if either
# pass fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
if [ "$#" -gt 0 ]; then
    exec python -m pytest "$@"
fi
status=0
python -m pytest || status=$?
echo "[test] numeric tests again with ATEN_CPU_CAPABILITY=default (generic kernels)"
ATEN_CPU_CAPABILITY=default python -m pytest -q -m "numeric and not slow and not gpu" || status=$?
exit "$status"
