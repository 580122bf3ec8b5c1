# vidtron: every target creates .venv and installs what it needs on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned everywhere, including pip's build isolation, so no CUDA wheel is ever pulled.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: venv install test test-slow demo bench lint format clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run make PY=python3"; exit 2; }
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

venv install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -x --durations=15 tests

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow tests

demo: $(VENV)/.installed
	$(BIN)/python -m vidtron.launch.demo --out demo_out

bench: $(VENV)/.installed
	$(BIN)/python -m bench.run_all

lint: $(VENV)/.installed
	$(BIN)/ruff check vidtron tests bench
	$(BIN)/ruff format --check vidtron tests bench

format: $(VENV)/.installed
	$(BIN)/ruff format vidtron tests bench
	$(BIN)/ruff check --fix vidtron tests bench

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
