# The README's two commands: `make demo` (set up + run the default federation) and
# `make test` (set up + run the whole test suite). Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsqueeze-installed

export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch is installed first, pinned, so pip takes the CPU wheel (pyproject.toml's range would
# otherwise let pip pick a CUDA build); then fedsqueeze with every extra: the light client
# (`pip install fedsqueeze`) plus server, simulation, edge, export and dev (pyproject.toml).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

demo: setup
	$(BIN)/fedsqueeze simulate

# Lint first (seconds), then every test, end-to-end ones included.
test: setup
	$(BIN)/ruff check fedsqueeze tests benchmarks simulations examples
	$(BIN)/ruff format --check fedsqueeze tests benchmarks simulations examples
	$(BIN)/python -m pytest -q --durations=20

lint: setup
	$(BIN)/ruff check fedsqueeze tests benchmarks simulations examples
	$(BIN)/ruff format --check fedsqueeze tests benchmarks simulations examples

bench: setup
	$(BIN)/python benchmarks/bench_codecs.py

clean:
	rm -rf runs .pytest_cache .hypothesis
