# The two commands a user needs: `make run` and `make test`. Everything else
# (virtualenv, install, code generation, migrations) happens on the way, and
# again only when its inputs change: pyproject.toml re-installs, a .proto (or
# the generator) regenerates.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto')
PROTO_STAMP := protos/.generated

# Extra arguments: make test PYTEST_ARGS='-k rewards -x'; make bench BENCH_ARGS='--rate 400'
PYTEST_ARGS ?=
BENCH_ARGS ?=
FAULTS_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help run test lint proto bench faults migrate seed clean install

help:
	@echo "make run      start PostgreSQL/Redis (embedded unless DATABASE_URL/REDIS_URL), migrate,"
	@echo "              seed the demo brand, run every service and the gateway; Ctrl-C stops"
	@echo "make test     lint (ruff, mypy) and the whole test suite"
	@echo "make bench    open-loop benchmark of the POS checkout path (BENCH_ARGS='--rate 400')"
	@echo "              other scenarios: BENCH_ARGS='identify ...' (list: .venv/bin/python -m bench list)"
	@echo "make faults   fault suite: kill, restart and wipe parts under POS load, check with SQL"
	@echo "              (FAULTS_ARGS='--quick' for the reduced run, '--write-docs' for the table)"
	@echo "make migrate  migrate every schema;  make seed  seed the demo brand"
	@echo "make lint | proto | install | clean"

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need Python 3.11 ($(PYTHON)) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP)

$(PROTO_STAMP): $(PROTO_FILES) servicekit/protogen.py $(STAMP)
	$(PY) -m servicekit.protogen
	@touch $@

# Unconditional regeneration, for when generated files were removed by hand.
proto: $(STAMP)
	$(PY) -m servicekit.protogen
	@touch $(PROTO_STAMP)

run: $(PROTO_STAMP)
	$(PY) -m servicekit.devrun run

migrate: $(PROTO_STAMP)
	$(PY) -m servicekit.devrun migrate

seed: $(PROTO_STAMP)
	$(PY) -m servicekit.devrun seed

lint: $(PROTO_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# tests/conftest.py starts embedded PostgreSQL/Redis itself when DATABASE_URL /
# REDIS_URL are unset, so pytest runs directly.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(PROTO_STAMP)
	$(PY) -m servicekit.devrun bench -- $(BENCH_ARGS)

faults: $(PROTO_STAMP)
	$(PY) -m bench faults $(FAULTS_ARGS)

clean:
	rm -rf .data $(PROTO_STAMP) .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find protos -name '*_pb2*.py*' -delete
