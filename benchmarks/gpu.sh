#!/usr/bin/env bash
# CUDA checks of the speed settings, in at most ~5 minutes, everything tee'd to a log.
#
#   bash benchmarks/gpu.sh [LOG]      (default LOG: results/benchmarks/gpu-<time>.log)
#
# 1. the gpu-marked tests: D-KD / SSD-KD steps on CUDA equal to CPU and to the seed-style
#    baselines, AMP bf16/fp16 steps close to float32, one engine epoch on CUDA with AMP
#    and channels-last (tests/test_optimisations.py);
# 2. benchmarks/run.py --quick --device cuda: float32 channels-last with all extras (hook
#    growth, batch scaling, projections), then the ratios only with AMP bf16, fp16 and
#    with channels-last off; the JSON of each run goes next to the log.
# Every command has its own timeout (sum 295 s); a failure is logged and the script goes
# on, then exits 1. Exit 3: no CUDA device. run.py exits 1 only for a missed target of the
# device it measured (the GPU targets here), never for the CPU targets.
#
# Interpreter: $PYTHON if set; else .venv/bin/python, created first by tools/env.sh (run,
# not sourced, so its `set -e` stays out of this script; TORCH_CUDA=... picks the torch
# build, README "GPU install") when a clean checkout has no .venv; else python3. The
# repository root is put on PYTHONPATH, so `raug` imports without the editable install.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ] && [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "[gpu.sh] no .venv: creating it with tools/env.sh"
    bash "$ROOT/tools/env.sh" || echo "[gpu.sh] tools/env.sh failed; trying python3"
fi
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STAMP="$(date +%Y%m%d-%H%M%S)"
LOG="${1:-results/benchmarks/gpu-$STAMP.log}"
OUT="$(dirname "$LOG")"
mkdir -p "$OUT"
exec > >(tee -a "$LOG") 2>&1

status=0
step() {  # step SECONDS CMD...: run with a timeout, log the outcome, never abort
    local limit="$1"; shift
    echo "== $(date +%T) [$limit s] $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!! exit $rc (124 = timeout): $*"
        status=1
    fi
}

if ! timeout 25 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "no CUDA device visible to $PY: nothing to check"
    exit 3
fi
timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    || echo "(nvidia-smi not available)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step 95 "$PY" -m pytest -m gpu tests/test_optimisations.py -q -p no:cacheprovider
BENCH=("$PY" benchmarks/run.py --quick --device cuda)
step 70 "${BENCH[@]}" --only channel_relation dkd_step ssd_kd_step \
    --json "$OUT/gpu-$STAMP-fp32-cl.json"
RATIOS=("${BENCH[@]}" --only dkd_step ssd_kd_step --skip-extras)
step 35 "${RATIOS[@]}" --amp bf16 --json "$OUT/gpu-$STAMP-bf16-cl.json"
step 35 "${RATIOS[@]}" --amp fp16 --json "$OUT/gpu-$STAMP-fp16-cl.json"
step 30 "${RATIOS[@]}" --no-channels-last --json "$OUT/gpu-$STAMP-fp32-nchw.json"

echo "== done $(date +%T), status $status, log $LOG"
exit "$status"
