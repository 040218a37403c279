# sched-adapter developer and CI entry points.
#
#   make venv         create .venv: the pinned versions of requirements-test.lock, then the package (editable)
#   make lock         regenerate requirements.lock + requirements-test.lock from pyproject.toml (pip-tools);
#                     keeps existing pins that still fit, `make lock LOCK_ARGS=--upgrade` takes the newest
#   make demo         run the demo server (PORT=8080; data in var/demo)
#   make demo-hl7v2   the demo over a simulated HL7v2 scheduler (PORT=8080, MLLP_PORT=2575; data in var/demo-hl7v2)
#   make system-deps  install unixODBC + ODBC drivers and chromium (root, Debian)
#   make services     make sure PostgreSQL and MariaDB answer
#   make lint         ruff check, ruff format --check, mypy (strict on adapter/; see [tool.mypy] in pyproject.toml)
#   make test         all of the above, then lint, then pytest (slow tests excluded)
#   make test-slow    only the tests marked slow
#   make bench        run bench/find.py ($find vs the HTTP floor)
#   make bench-book   run bench/book.py (bookings/s, conflict storm, double bookings)
#   make bench-search run bench/search.py (ITI-118 on 1,000,000 appointments)
#   make bench-report run bench/report.py (JSON + PNG plots under docs/bench/; 3-10 min)
#   make clean        remove .venv and var/

PYTHON ?= python3
VENV ?= .venv
PORT ?= 8080
PYTEST_ARGS ?=
LOCK_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Steps must run in order (system packages before pip, services before tests).
.NOTPARALLEL:
.PHONY: venv lock demo demo-hl7v2 system-deps services lint test test-slow bench bench-book bench-search bench-report clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-run pip only when pyproject.toml or the lock is newer than the stamp. The lock brings setuptools, so the
# editable install builds without fetching a build environment.
$(STAMP): pyproject.toml requirements-test.lock | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements-test.lock
	$(BIN)/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# requirements.lock: what the product runs on (the Docker image); requirements-test.lock: plus the test extras.
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-trusted-host --no-emit-find-links $(LOCK_ARGS)
lock: | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check --quiet 'pip-tools>=7.4,<8'
	$(PIP_COMPILE) -o requirements.lock pyproject.toml
	$(PIP_COMPILE) --extra test -o requirements-test.lock pyproject.toml

demo: venv
	$(BIN)/sched-adapter demo --port $(PORT)

MLLP_PORT ?= 2575
demo-hl7v2: venv
	$(BIN)/sched-adapter demo --backend hl7v2 --port $(PORT) --mllp-port $(MLLP_PORT)

system-deps:
	bash scripts/install-system-deps.sh

services:
	bash scripts/start-services.sh

# pytest exits 5 when it collected no test: say so and keep the failure.
define run_pytest
	@echo "+ $(BIN)/pytest $(1)"; \
	$(BIN)/pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest ran no tests (exit 5) -- treated as failure" >&2; fi; \
	exit $$rc
endef

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: system-deps services venv lint
	$(call run_pytest,$(PYTEST_ARGS))

test-slow: system-deps services venv
	$(call run_pytest,-m slow $(PYTEST_ARGS))

bench: system-deps services venv
	$(BIN)/python bench/find.py

bench-book: system-deps services venv
	$(BIN)/python bench/book.py

bench-search: system-deps services venv
	$(BIN)/python bench/search.py

bench-report: system-deps services venv
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test,bench]'
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) var/
