# sched-adapter developer and CI entry points.
#
#   make venv         create .venv and install the package with test extras
#   make demo         run the demo server (PORT=8080)
#   make system-deps  install unixODBC + ODBC drivers (root, Debian)
#   make services     make sure PostgreSQL, MariaDB and Redis answer
#   make test         all of the above, then pytest (slow tests excluded)
#   make test-slow    only the tests marked slow
#   make bench        run bench/find.py ($find vs the HTTP floor)
#   make bench-book   run bench/book.py (bookings/s, conflict storm, double bookings)
#   make bench-search run bench/search.py (ITI-118 on 1,000,000 appointments)
#   make bench-report run bench/report.py (JSON + PNG plots under docs/bench/; ~10 min)
#   make clean        remove .venv and var/

PYTHON ?= python3
VENV ?= .venv
PORT ?= 8080
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Steps must run in order (system packages before pip, services before tests).
.NOTPARALLEL:
.PHONY: venv demo system-deps services test test-slow bench bench-book bench-search bench-report clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-run pip only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[test]'
	touch $@

demo: venv
	$(BIN)/sched-adapter demo --port $(PORT)

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

test: system-deps services venv
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
