# Two commands: `make run` and `make test`. Everything else is set up on the way.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := tests/node/node_modules/.installed-stamp

.PHONY: setup run test test-real test-services node-deps generate lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The server on 127.0.0.1:50051 with SQLite traces (llm-gateway.db); flags and LLMGW_* apply.
run: setup
	$(VENV)/bin/llm-gateway serve $(ARGS)

# Real PostgreSQL and ClickHouse from Debian packages (installed when missing; tests start them).
test-services:
	scripts/install-test-services

$(NODE_STAMP): tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --silent
	touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)

test: setup test-services node-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# llama.cpp's own llama-server (built once from the llama-cpp-python sdist, cached under
# ~/.cache/llm-gateway) with tiny models: tests/real/ (deselected by `make test`).
test-real: setup
	PYTHON=$(PY) scripts/build-llama-server
	$(PY) -m pytest -m real tests/real $(PYTEST_ARGS)

generate: setup
	scripts/generate-protos

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint

bench: setup
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache
