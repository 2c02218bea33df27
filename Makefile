# The two commands a user needs: `make run` and `make test`. Everything else
# (virtualenv, install, code generation, migrations) happens on the way.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto')
PROTO_STAMP := protos/.generated

.PHONY: run test lint proto bench migrate seed clean install

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need Python 3.11 ($(PYTHON)) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP)

$(PROTO_STAMP): $(PROTO_FILES) $(STAMP)
	$(PY) -m servicekit.protogen
	@touch $@

proto: $(STAMP)
	$(PY) -m servicekit.protogen
	@touch $(PROTO_STAMP)

run: $(PROTO_STAMP)
	$(PY) -m servicekit.devrun run

migrate: $(PROTO_STAMP)
	$(PY) -m servicekit.devrun migrate

lint: $(PROTO_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(PROTO_STAMP) lint
	$(PY) -m servicekit.devrun test -- $(PYTEST_ARGS)

bench: $(PROTO_STAMP)
	$(PY) -m servicekit.devrun bench -- $(BENCH_ARGS)

clean:
	rm -rf .data $(PROTO_STAMP)
	find protos -name '*_pb2*.py*' -delete
