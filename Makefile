# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install, run the main job on the embedded default model
#   make test   -- create .venv, install, run the test suite
# TORCH_SPEC installs torch first so nothing pulls CUDA builds on a CPU machine;
# users with GPUs can override it, e.g. make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test lint clean bench-env bench-ct-env

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/circuitgraph --threads $(THREADS) demo

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check circuitgraph dictionaries tests benchmarks examples

clean:
	rm -rf $(VENV)

# Benchmark environment: peers (SAELens, EleutherAI sparsify) installed beside this package, never runtime dependencies.
bench-env: .venv-bench/.installed

.venv-bench/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --upgrade pip
	.venv-bench/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-bench/bin/python -m pip install -q sae-lens eai-sparsify
	.venv-bench/bin/python -m pip install -q -e ".[dev]"
	touch $@

# circuit-tracer pins transformers<=4.57 (SAELens wants newer), so it gets its own environment
bench-ct-env: .venv-ct/.installed

.venv-ct/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-ct
	.venv-ct/bin/python -m pip install -q --upgrade pip
	.venv-ct/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-ct/bin/python -m pip install -q circuit-tracer
	.venv-ct/bin/python -m pip install -q -e ".[dev]"
	touch $@
