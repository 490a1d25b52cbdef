# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   set everything up and run the whole path locally
#   make test   run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean browser

setup: $(STAMP)

# The code needs Python 3.11+: say so before pip fails on it, and rebuild a .venv an older
# Python left behind instead of reusing it.
$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "$(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(not runnable)'); this project needs 3.11 or newer: run make PYTHON=python3.11 (or 3.12, 3.13)"; exit 1; }
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	  echo "$(VENV) was made with an older Python: making it again"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m localdev.demo

test: $(STAMP) lint browser
	$(PY) -m pytest

# The fast tier, for the edit loop: under a minute, without the tests marked slow (the fleet,
# soak, deadline, crash and fuzzing runs, the command line, the deploy scripts). `make test` runs all.
.PHONY: test-fast
test-fast: $(STAMP) browser
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/shellcheck -x deploy/*.sh scripts/*.sh

# Debian's headless Chromium and chromedriver, for the tests that open pages in a real browser.
browser:
	bash scripts/ensure-browser.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results test-output

# The benchmark (bench/README.md): not part of `make test`. Options through BENCH_ARGS,
# e.g. make bench BENCH_ARGS=--quick
.PHONY: bench
bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

# The sharded-backfill scenario (issue 7): several function processes behind the relay.
.PHONY: bench-fleet
bench-fleet: $(STAMP)
	$(PY) -m bench.fleet $(BENCH_ARGS)

# The quota scenarios (issue 15): the adaptive limit against quotas the function is not told.
.PHONY: bench-quota
bench-quota: $(STAMP)
	$(PY) -m bench.quota $(BENCH_ARGS)

# The batch-mode scenario (issue 18): the same backfill online and through the Batch API.
.PHONY: bench-batch
bench-batch: $(STAMP)
	$(PY) -m bench.batch $(BENCH_ARGS)
