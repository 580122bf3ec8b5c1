# vidtron: every target creates .venv and installs what it needs on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned everywhere, including pip's build isolation, so no CUDA wheel is ever pulled.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: venv install test test-slow test-gpu demo vae-demo sweep-demo bench lint format clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run make PY=python3"; exit 2; }
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# DeepSpeed (parallel.zero.engine=deepspeed) is an sdist whose setup imports torch: build it against ours,
	# with no JIT ops (DS_BUILD_OPS=0). Same pin as the [deepspeed] extra.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.19.8,<0.20"
	@touch $@

venv install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -x --durations=15 tests

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow tests

# On a CUDA machine (a CUDA build of the pinned torch in .venv): every gpu-marked test, then a short GPU bench
# (bench/results/gpu.json, under 8 min). Without CUDA the tests skip and the bench says so; both exit 0.
test-gpu: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m gpu tests
	$(BIN)/python -m bench.gpu_check

demo: $(VENV)/.installed
	$(BIN)/python -m vidtron.launch.demo --out demo_out

# Train a tiny causal VAE on generated clips for a bounded time and report held-out PSNR / SSIM.
vae-demo: $(VENV)/.installed
	$(BIN)/python -m vidtron.launch.vae_demo --out demo_vae --minutes 8

SWEEP_OUT ?= sweep_out
# A real small scaling sweep (5 sizes x 12 budgets) on generated data; ~15-30 min on 2 cores.
sweep-demo: $(VENV)/.installed
	@test -f $(SWEEP_OUT)/data/autoencoder.safetensors || $(BIN)/python -m vidtron.launch.data synth --out $(SWEEP_OUT)/data --clips 1024 --frames 9 --height 64 --width 64 --seed 0 --shard-size 256
	$(BIN)/python -m vidtron.launch.sweep recipe=scaling_sweep out=$(SWEEP_OUT) data.root=$(SWEEP_OUT)/data sizes=5 budgets=7680:500000:12 max_parallel=0 --budget-pflops 0.1

bench: $(VENV)/.installed
	$(BIN)/python -m bench.run_all

lint: $(VENV)/.installed
	$(BIN)/ruff check vidtron tests bench
	$(BIN)/ruff format --check vidtron tests bench

format: $(VENV)/.installed
	$(BIN)/ruff format vidtron tests bench
	$(BIN)/ruff check --fix vidtron tests bench

clean:
	rm -rf $(VENV) demo_out demo_vae sweep_out runs .pytest_cache
