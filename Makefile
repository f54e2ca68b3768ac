# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and reinstall only when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest processes for `make test` (pytest-xdist): the integration tests mostly wait on
# brokers and workers, so two halve the suite's time on a 2-core machine; 0 runs it in one.
TEST_WORKERS ?= 2

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: otherwise sentence-transformers pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The static embedder (ROUTER_EMBEDDER=static), distilled offline from the packaged
	# MiniLM into .omnirouter/embedders; a router would otherwise build it on first use.
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/omnirouter embedder build
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/omnirouter demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .omnirouter .pytest_cache .mypy_cache .ruff_cache
