#!/usr/bin/env bash
# The GPU benchmark matrix of issue 16 at 224 px, everything tee'd to a log.
#
#   bash benchmarks/gpu.sh [LOG]      (default LOG: results/benchmarks/gpu-<time>.log)
#   BENCH_DEVICE=cpu bash benchmarks/gpu.sh LOG   (dry run of the same commands: run.py --tiny)
#
# 1. the gpu-marked tests: D-KD / SSD-KD steps on CUDA equal to CPU and to the seed-style
#    baselines, AMP bf16/fp16 steps close to float32, one engine epoch on CUDA with AMP
#    and channels-last (tests/test_optimisations.py);
# 2. benchmarks/run.py: teacher, D-KD and SSD-KD steps (batch 32; SSD-KD 8 images = 32
#    views) at 224 px in fp32, AMP, AMP + channels-last and AMP + channels-last + compile
#    (AMP = the engine's _amp="auto": bf16 on sm80+, fp16 on sm70/sm75), each against the
#    seed-style float32 NCHW step on the same GPU;
# 3. the loader item (cache vs originals) with the toolkit pipeline's images/s for 1, 2, 4
#    and 8 workers (a 64-image set made on first use);
# 4. run.py --summarize: the matrix as one markdown table (images/s per variant, the seed
#    step, the loader per worker, whether the loader keeps up with the D-KD step).
# The JSON of each run goes next to the log. Every command has its own timeout (sum 645 s);
# a failure is logged and the script goes on, then exits 1. Exit 3: no CUDA device. run.py
# exits 1 only for a missed GPU target (D-KD with AMP + channels-last >= 2.5x the seed-style
# float32 step), never for the CPU targets; the dry run judges nothing.
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
DEVICE="${BENCH_DEVICE:-cuda}"
STAMP="$(date +%Y%m%d-%H%M%S)"
LOG="${1:-results/benchmarks/gpu-$STAMP.log}"
OUT="$(dirname "$LOG")"
mkdir -p "$OUT"
exec > >(tee -a "$LOG") 2>&1

status=0
SCALE=1  # timeouts x SCALE: the dry run's CPU steps take seconds where the GPU's take ms
step() {  # step SECONDS CMD...: run with a timeout, log the outcome, never abort
    local limit=$(($1 * SCALE)); shift
    echo "== $(date +%T) [$limit s] $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '\n!! exit %s (124 = timeout): %s\n' "$rc" "$*"
        status=1
    fi
}

if [ "$DEVICE" = cpu ]; then
    echo "dry run on the CPU (run.py --tiny): no figure of this log means anything"
    SIZE=(--tiny --data-dir "$OUT/loader_data")
    SCALE=4
else
    if ! timeout 25 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
        echo "no CUDA device visible to $PY: nothing to check"
        exit 3
    fi
    timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        || echo "(nvidia-smi not available)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    step 90 "$PY" -m pytest -m gpu tests/test_optimisations.py -q -p no:cacheprovider
    SIZE=(--quick --px 224)
fi

RUN=("$PY" benchmarks/run.py --device "$DEVICE" "${SIZE[@]}")
STEPS=("${RUN[@]}" --only teacher_step dkd_step ssd_kd_step --skip-extras)
JSON="$OUT/gpu-$STAMP"
step 75 "${STEPS[@]}" --amp off --no-channels-last --json "$JSON-1-fp32.json"
step 75 "${STEPS[@]}" --amp auto --no-channels-last --json "$JSON-2-amp.json"
step 75 "${STEPS[@]}" --amp auto --json "$JSON-3-amp-cl.json"
step 180 "${STEPS[@]}" --amp auto --compile --json "$JSON-4-amp-cl-compile.json"
step 120 "${RUN[@]}" --only loader --loader-workers 1 2 4 8 --json "$JSON-5-loader.json"
step 30 "$PY" benchmarks/run.py --summarize "$JSON"-*.json

echo "== done $(date +%T), status $status, log $LOG"
exit "$status"
