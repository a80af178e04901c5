# One entry point for people and CI alike. `make run` and `make test` are the
# README's two commands; both set up .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup run demo test lint bench load clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

run: setup  ## migrate ./pipeline.db and serve the API and dashboard on 127.0.0.1:8000
	$(BIN)/pipeline migrate
	$(BIN)/pipeline serve

demo: setup  ## run the example pipeline once in this terminal, with live progress
	$(BIN)/pipeline migrate
	$(BIN)/pipeline run --wait

test: setup  ## the whole test suite
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup  ## the benchmark suite (bench/README.md); --quick is what CI runs
	$(BIN)/python -m bench

load: setup  ## a 60 s soak of a real server (bench/load.py)
	$(BIN)/python -m bench.load

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
