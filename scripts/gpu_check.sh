#!/usr/bin/env bash
# The prepared GPU check: runs a bundle made here by `make gpu-bundle` (scripts/gpu_check.py
# prepare) on a GPU machine that has python3 + numpy (+ torch for the cuBLASLt / FP16 peers)
# but no TVM and no network. The bundle carries a runtime-only TVM (no compiler), the
# apache-tvm-ffi wheel for that Python, the compiled kernels and zoo models, and their CUDA
# binaries (one bundle.tar.xz), so nothing is compiled there. About 2 minutes; writes
# $OUT/gpu_check.json (OUT defaults to ./out).
#   device tool: run(command="bash scripts/gpu_check.sh", carry=[".gpubundle"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BUNDLE:-.gpubundle}
[ -f "$B/bundle.tar.xz" ] || { echo "no bundle at $B: run 'make gpu-bundle' first" >&2; exit 2; }
PY=${PYTHON:-python3}
OUT=${OUT:-out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/flexiq_gpu.XXXX)
tar xJf "$B/bundle.tar.xz" -C "$WORK"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "$WORK"/wheels/*.whl
export PYTHONPATH="$WORK/site:$WORK/py" TVM_USE_RUNTIME_LIB=1 TVM_FFI_DISABLE_TORCH_C_DLPACK=1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv || true
timeout 360 "$PY" scripts/gpu_check.py run --bundle "$WORK" --json "$OUT/gpu_check.json" \
    2>&1 | grep -v "Scope Loaded" | tee "$OUT/gpu_check.log"
