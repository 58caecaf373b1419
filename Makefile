# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moelens-installed

.PHONY: setup demo test browser bench clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned requirement can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[app,dev,nnsight,notebooks]"
	touch $(STAMP)

# Records the bundled demo model over its held-out corpus into traces/moelens.duckdb and opens the workbench.
demo: setup
	$(BIN)/moelens demo

# Debian's chromium drives the app's end-to-end test (installed once; skipped where apt is unavailable).
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"; }

test: setup browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/record_overhead.py
	$(BIN)/python benchmarks/analysis.py

clean:
	rm -rf $(VENV) .pytest_cache
