# digit-service: `make run` serves on 127.0.0.1:8000, `make test` runs the tests.
# Every target sets up what it needs (venv, data, base model) and skips what is done.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA_DIR ?= data
REGISTRY ?= registry
export DIGITS_DATA_DIR := $(DATA_DIR)
export DIGITS_REGISTRY := $(REGISTRY)

.PHONY: install data train retrain run test browser lint loadtest bench bench-finetune bench-runtimes bench-preprocess gpu-bench clean

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing digit-service with its dev tools (torch is ~5 GB: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

data: install
	@echo "==> MNIST in $(DATA_DIR)"
	$(PY) -m model prepare-data

train: data
	@echo "==> base model in $(REGISTRY) (trained only if the registry has no active version)"
	$(PY) -m model train --if-missing

retrain: data
	$(PY) -m model train

run: train
	@echo "==> serving on http://127.0.0.1:8000 (Ctrl+C stops it)"
	$(PY) -m service

# The browser test drives Debian's Chromium (never a test tool's own browser download).
browser:
	@command -v chromium >/dev/null || { echo "==> installing Chromium for the browser test (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: train browser
	@echo "==> tests"
	$(PY) -m pytest -ra

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile

loadtest: train
	$(PY) -m loadtest.run_locust

bench: train
	@command -v hey >/dev/null || (echo "==> installing the load generator hey" && apt-get install -y hey)
	$(PY) -m loadtest.bench

bench-finetune: train
	@command -v hey >/dev/null || (echo "==> installing the load generator hey" && apt-get install -y hey)
	$(PY) -m loadtest.finetune_bench

bench-runtimes: train
	$(PY) -m loadtest.runtime_bench

bench-preprocess: data
	$(PY) -m loadtest.preprocess_bench

gpu-bench:
	bash loadtest/gpu_bench.sh

clean:
	rm -rf reports .pytest_cache
