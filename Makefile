# Each target creates .venv and installs the pinned requirements once; it
# re-installs only when a requirements file changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test unit app system integration nemesis lint format analysis clean

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

## run: start a local cluster (leader on 8000, five followers on 8001-8005)
run: $(STAMP)
	$(PY) tools/cluster.py $(ARGS)

## test: the whole suite: unit tests, then the integration suite against a local cluster
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

## unit: the pure core only (no sockets, no processes): seconds
unit: $(STAMP)
	$(PY) -m pytest tests/unit $(ARGS)

## app: both apps in-process through httpx's ASGITransport
app: $(STAMP)
	$(PY) -m pytest tests/app $(ARGS)

## system: real processes: tests/system and the integration suite
system: $(STAMP)
	$(PY) -m pytest tests/system test_integration.py $(ARGS)

integration: $(STAMP)
	$(PY) -m pytest test_integration.py $(ARGS)

## nemesis: random faults against a real cluster, then a history check (ARGS="--seconds 600 --seed N")
nemesis: $(STAMP)
	$(PY) tools/nemesis.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## analysis: the quorum-versus-latency study (starts its own cluster if none runs on :8000)
analysis: $(STAMP)
	$(PY) performance_analysis.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
