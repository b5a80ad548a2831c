# nephrolith: setup, demo, tests, certificates and services.
# Every target that needs Python creates .venv first, so a fresh clone needs
# nothing installed by hand beyond python3 (3.11) and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nephrolith-installed
DEMO_DIR ?= runs/demo
CERTS_DIR ?= certs
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1

.PHONY: setup demo demo-local test test-quick browser certs lint bench clean

$(STAMP): requirements/runtime.txt requirements/nodeps.txt requirements/dev.txt common/pyproject.toml client/pyproject.toml server/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools<81" wheel
	$(BIN)/pip install --quiet -r requirements/runtime.txt -r requirements/dev.txt
	# tf-keras and tensorflow-hub without their dependencies (see requirements/nodeps.txt).
	$(BIN)/pip install --quiet --no-deps -r requirements/nodeps.txt
	$(BIN)/pip install --quiet --no-deps -e common -e client -e server
	touch $(STAMP)

setup: $(STAMP)

## The main job on the embedded default: a federation of three synthetic hospitals over TLS.
demo: setup
	$(BIN)/python -m nephrolith.server.demo --out $(DEMO_DIR)

## The local pipeline only: synthetic data, single-site training, evaluation report.
demo-local: setup
	$(BIN)/nephrolith-client make-demo-data $(DEMO_DIR)/data --hospitals 1
	$(BIN)/nephrolith-client train-local $(DEMO_DIR)/data/site-1 --out $(DEMO_DIR)/local \
		--backbone compact --image-size 64 --epochs 3
	$(BIN)/nephrolith-client evaluate $(DEMO_DIR)/local/checkpoint $(DEMO_DIR)/data/site-1 \
		--out $(DEMO_DIR)/local/report --n-boot 200

## Chromium for the browser test, from Debian's packages (skipped when present).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium ; }

## The full suite, slow tests included (what CI runs).
test: setup browser
	$(BIN)/python -m pytest

## The quick loop: everything but the tests marked slow.
test-quick: setup
	$(BIN)/python -m pytest -m "not slow"

certs: setup
	$(BIN)/nephrolith-server certs --out $(CERTS_DIR)

lint: setup
	$(BIN)/ruff check common client server tests

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache test-artifacts
