# Two commands on a fresh machine: `make demo` (main job) and `make test` (tests).
# Each creates/uses .venv and installs everything it needs (scripts/setup.sh).
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/flexiq-tvm demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check python tests setup.py

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info .pytest_cache
