# Two commands on a fresh machine: `make demo` (main job) and `make test` (tests).
# Each creates/uses .venv and installs everything it needs (scripts/setup.sh).
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow bench gpu-bundle lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/flexiq-tvm demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# FlexiQ vs torch / onnxruntime / TVM FP32, kernels and ratio switch (tens of minutes)
bench: setup
	$(BIN)/flexiq-tvm -v bench --json docs/results/bench.json

# The GPU check's bundle, built here (compiler + nvcc, no GPU; about 3 minutes), then run on a
# GPU machine without TVM by scripts/gpu_check.sh (see docs/cuda.md)
gpu-bundle: setup
	$(BIN)/python scripts/gpu_check.py prepare --bundle .gpubundle

lint: setup
	$(BIN)/ruff check python tests setup.py schedules scripts

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info .pytest_cache
