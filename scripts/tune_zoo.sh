#!/usr/bin/env bash
# Tune the FMNIST zoo models' non-FlexiQ kernels into schedules/llvm/tuned (committed), one
# after another (they share the database). Usage: scripts/tune_zoo.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-12}
for m in resnet20_fmnist mobilenetv2_fmnist vit_fmnist swin_fmnist; do
  .venv/bin/flexiq-tvm -v tune --model "$m" --trials "$trials" --json "docs/results/$m.tune.json"
done
