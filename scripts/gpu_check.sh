#!/usr/bin/env bash
# The prepared GPU check (no network, a few minutes): bit-exactness of the CUDA mixed
# INT8/INT4 kernel against the oracle at ratios 0/0.5/1, and its timings beside
# torch._int_mm (cuBLASLt INT8) and FP16 matmul. Writes $OUT/gpu_check.json (OUT defaults
# to ./out). Run from a checkout whose .venv was carried over, or with PYTHON set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,compute_cap --format=csv || true
timeout 290 "$PY" scripts/gpu_check.py --json "$OUT/gpu_check.json" --zoo-budget-s 150
