#!/usr/bin/env bash
# The prepared GPU check (issue 9): on a machine with a CUDA GPU, in under 8 minutes, install this
# checkout, run the GPU kernels' tests on the device, make a 7B-geometry model with a power-law
# activation profile, and measure decoding with a third of its bytes as the --vram-budget against
# our predicted mode on the CPU, our dense mode with the same budget spent on whole layers, and
# llama.cpp offloading it as whole layers (where a CUDA build of llama-cpp-python is installed).
#
#   tools/gpu_check.sh --prepare   # on a machine with PyPI: the wheels the GPU machine lacks, into .gpu-wheels/
#   tools/gpu_check.sh             # on the GPU machine (carry .gpu-wheels): install, test, make, bench
#
# Environment: OUT (folder for the model and the report, default /tmp/gpu-check), MODEL (an existing
# make_synthetic_7b.py file to use instead of making one; its .predictor folder beside it), DEVICE
# (cuda, or cpu to run the same split with the CPU as its fast side, on a machine with no GPU),
# REPS (bench repetitions, default 3), TOKENS (tg length, default 32).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
if [[ "${1:-}" == --prepare ]]; then
    python3 -m pip download -q --no-deps -d "$WHEELS" gguf
    ls "$WHEELS"
    exit 0
fi
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
REPS=${REPS:-3}
TOKENS=${TOKENS:-32}
mkdir -p "$OUT"
step() { echo "== $(date +%T) $*" >&2; }

step "install"
if ! python3 -c "import gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps "$WHEELS"/gguf-*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .

if [[ "$DEVICE" == cuda ]]; then
    step "GPU visible"
    NUMBA_ENABLE_CUDASIM=0 python3 -c "
import sys
from hybridinfer.kernels import cuda
sys.exit(f'gpu_check: {cuda.available()}' if cuda.available() else 0)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    step "GPU tests on the device"
    NUMBA_ENABLE_CUDASIM=0 python3 -m pytest -q tests/test_kernels_cuda.py tests/test_attention_cuda.py tests/test_hybrid.py -k "cuda"
fi

MODEL=${MODEL:-$OUT/synth7b.gguf}
PREDICTOR=${MODEL%.gguf}.predictor
if [[ ! -f "$MODEL" ]]; then
    step "make a 7B-geometry model (Q4_0, power-law firing rates)"
    python3 tools/make_synthetic_7b.py -o "$MODEL" --calibration 8 32
fi
STATS=${MODEL%.gguf}.stats.safetensors
if [[ ! -f "$STATS" ]]; then
    step "profile it"
    python3 -m hybridinfer.cli profile "$MODEL" --data README.md --tokens 256 -c 128 -o "$STATS" > "$OUT/profile.md"
fi
BUDGET=$(python3 -c "import os; print(f'{os.path.getsize(\"$MODEL\") / 3 / 2**30:.3f}')")
EXTRA=()
if [[ "$DEVICE" == cuda ]] && python3 -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())" 2>/dev/null; then
    EXTRA+=(--vs-llamacpp)
else
    echo "gpu_check: no CUDA build of llama-cpp-python here: llama.cpp is left out" >&2
fi
step "bench: --vram-budget $BUDGET GiB (a third of the file) on $DEVICE"
NUMBA_ENABLE_CUDASIM=0 python3 -m hybridinfer.cli bench "$MODEL" --predictor "$PREDICTOR" --profile "$STATS" \
    --vram-budget "$BUDGET" --device "$DEVICE" -p 0 -n "$TOKENS" -r "$REPS" --vs-predicted --vs-dense \
    "${EXTRA[@]}" | tee "$OUT/bench.md"
step "done: $OUT/bench.md"
