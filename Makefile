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
# make profile PROFILE=gateway,rewards BENCH_ARGS='identify ...' (process names as in the CPU table, or all)
PROFILE ?= gateway,rewards
FAULTS_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help run test test-shifted lint proto bench profile faults migrate seed clean install image image-smoke

help:
	@echo "make run      start PostgreSQL/Redis (embedded unless DATABASE_URL/REDIS_URL), migrate,"
	@echo "              seed the demo brand, run every service and the gateway; Ctrl-C stops"
	@echo "make test     lint (ruff, mypy) and the whole test suite"
	@echo "make test-shifted  the suite with the clock a year ahead (needs Debian's faketime)"
	@echo "make bench    open-loop benchmark of the POS checkout path (BENCH_ARGS='--rate 400')"
	@echo "              other scenarios: BENCH_ARGS='identify ...' (list: .venv/bin/python -m bench list)"
	@echo "make profile  a bench scenario with py-spy flame graphs of its measured run, as SVG"
	@echo "              in bench/profiles/ (PROFILE=gateway,rewards | all; BENCH_ARGS as for bench)"
	@echo "make faults   fault suite: kill, restart and wipe parts under POS load, check with SQL"
	@echo "              (FAULTS_ARGS='--quick' for the reduced run, '--write-docs' for the table)"
	@echo "make migrate  migrate every schema;  make seed  seed the demo brand"
	@echo "make image    build the container image with buildah (BASE_IMAGE=..., IMAGE=..., IMAGE_TAG=...)"
	@echo "make image-smoke  build a Debian base with debootstrap, the image on it, then migrate"
	@echo "              and health-check a service inside it (root, buildah, debootstrap; docs/deploy.md)"
	@echo "make lint | proto | install | clean"

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need Python 3.11 ($(PYTHON)) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	@touch $@

install: $(STAMP)

# checkov in its own venv (deploy/checkov-requirements.txt says why); used by tests/deploy.
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed
$(TOOLS_STAMP): deploy/checkov-requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need Python 3.11 ($(PYTHON)) on PATH"; exit 1; }
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet -r deploy/checkov-requirements.txt
	@touch $@

$(PROTO_STAMP): $(PROTO_FILES) servicekit/protogen.py $(STAMP)
	$(PY) -m servicekit.protogen
	@touch $@

# Unconditional regeneration, for when generated files were removed by hand.
proto: $(STAMP)
	$(PY) -m servicekit.protogen
	@touch $(PROTO_STAMP)

run: $(PROTO_STAMP)
	$(PY) -m devtools.devrun run

migrate: $(PROTO_STAMP)
	$(PY) -m devtools.devrun migrate

seed: $(PROTO_STAMP)
	$(PY) -m devtools.devrun seed

lint: $(PROTO_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# tests/conftest.py starts embedded PostgreSQL/Redis itself when DATABASE_URL /
# REDIS_URL are unset, so pytest runs directly.
test: lint $(TOOLS_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite again with the clock moved (a year ahead by default; SHIFT='@2027-06-01
# 00:00:00' starts at a date): a test that depends on today's date fails here. The
# tests and the services they start run under libfaketime (Debian's `faketime`);
# PostgreSQL keeps the real clock (its timers do not fire under libfaketime), so this
# also checks that business times come from the application's clock, not the
# database's now(). CI runs it after `make test`.
SHIFT ?= +365d
test-shifted: $(PROTO_STAMP) $(TOOLS_STAMP)
	@command -v faketime >/dev/null 2>&1 || { echo "make test-shifted needs libfaketime: apt-get install faketime"; exit 1; }
	faketime -f '$(SHIFT)' $(PY) -m pytest $(PYTEST_ARGS)

bench: $(PROTO_STAMP)
	$(PY) -m devtools.devrun bench -- $(BENCH_ARGS)

# The same run as `make bench`, sampled by py-spy while it measures (bench/profile.py).
profile: $(PROTO_STAMP)
	BENCH_PROFILE='$(PROFILE)' $(PY) -m devtools.devrun bench -- $(BENCH_ARGS)

faults: $(PROTO_STAMP)
	$(PY) -m bench faults $(FAULTS_ARGS)

clean:
	rm -rf .data $(TOOLS_VENV) $(PROTO_STAMP) .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find protos -name '*_pb2*.py*' -delete

# A comma inside $(if ...).
, := ,

# ---- container image (docs/deploy.md). Needs buildah; no Docker engine.
IMAGE ?= localhost/loyalty-platform
IMAGE_TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
# The Containerfile's default is a slim official Python image; image-smoke
# passes a base built locally from Debian packages (no registry needed).
BASE_IMAGE ?=
LOCAL_BASE_IMAGE := localhost/loyalty-base:bookworm-py311
# CA bundle handed to pip in the build (a secret, not a layer): the host's trust store.
BUILD_CA ?= $(firstword $(wildcard /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt))
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	buildah bud --isolation chroot --network host --layers -f Containerfile \
	  $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	  $(if $(BUILD_CA),--secret id=ca$(,)src=$(BUILD_CA)) \
	  --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null || echo unknown) \
	  -t $(IMAGE):$(IMAGE_TAG) .

image-smoke:
	BASE_TAG=$(LOCAL_BASE_IMAGE) deploy/image/base-from-debian.sh
	$(MAKE) image BASE_IMAGE=$(LOCAL_BASE_IMAGE)
	IMAGE=$(IMAGE):$(IMAGE_TAG) deploy/image/smoke.sh
