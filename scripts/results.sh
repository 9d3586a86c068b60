#!/usr/bin/env bash
# Regenerate the accuracy figures of docs/results.md (takes about an hour on 2 cores).
# JSON goes to docs/results/; tables are printed by scripts/render_results.py.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p docs/results
for m in resnet20_fmnist mobilenetv2_fmnist vit_fmnist swin_fmnist efficientnet_lite0_imagenet; do
  $BIN/flexiq-tvm eval --model "$m" --json "docs/results/$m.fp32.json" --via torch.export --via onnx
done
for m in resnet20_fmnist mobilenetv2_fmnist vit_fmnist swin_fmnist; do
  $BIN/flexiq-tvm -v eval --model "$m" --ratios 0,0.25,0.5,0.75,1 --limit 2000 --search-images 32 \
    --population 8 --generations 8 --json "docs/results/$m.quant.json"
done
$BIN/flexiq-tvm -v eval --model efficientnet_lite0_imagenet --ratios 0,0.25,0.5,0.75,1 \
  --search-images 32 --generations 10 --json docs/results/efficientnet_lite0_imagenet.quant.json
$BIN/python scripts/render_results.py docs/results/*.quant.json
