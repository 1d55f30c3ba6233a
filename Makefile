# The two commands of a fresh clone: `make run` and `make test`. Both create .venv/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test lint format clean bench

install: $(VENV)/.installed

# What serving needs: appchat and its own dependencies (`make run`).
$(VENV)/.base: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "appchat needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

# Everything: every extra and the tools of the tests (`make install`, `make test`).
$(VENV)/.installed: $(VENV)/.base pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.base
	$(BIN)/appchat serve --dev

lint: install
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)
	$(BIN)/mypy

test: lint
	$(BIN)/pytest --cov --cov-report=term

# Side by side: appchat and the reference servers of bench/reference/ (bench/suite.py).
# Writes docs/benchmarks.md and docs/img/; BENCH_ARGS="--tiny --out DIR" for a smoke run.
BENCH_ARGS ?= --write
bench: install
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

format: install
	$(BIN)/ruff check --fix src tests $(wildcard bench)
	$(BIN)/ruff format src tests $(wildcard bench)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
