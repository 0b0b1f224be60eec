# Two commands set everything up on a fresh machine:
#   make demo   train + evaluate a small DAIPNet on the built-in generated dataset
#   make test   lint, then the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv demo test test-fast lint format bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m daipnet_jax.demo --workdir $(WORKDIR)

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy daipnet_jax

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/run_all.py --out bench/RESULTS.md

clean:
	rm -rf $(VENV) .cache

# The accelerator benchmark (bench/accelerator.py): runs in the environment's python when there
# is no venv (an accelerator machine without TensorFlow); `make bench-accel BENCH_ARGS=--quick`.
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
BENCH_ARGS ?=

.PHONY: bench-accel
bench-accel:
	$(BENCH_PY) bench/accelerator.py $(BENCH_ARGS)
