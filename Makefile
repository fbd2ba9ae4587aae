# `make run` installs only what the service and the cluster launcher need (the part of
# requirements.txt above its marker line, as the Dockerfile does); `make test`, `make lint`
# and the rest install everything. Each installs once, and again only when a requirements
# file changes. pip shows its progress as it goes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SERVICE_STAMP := $(VENV)/.installed-service
STAMP  := $(VENV)/.installed

.PHONY: docs docs-serve certs run run-ha failover test unit app system integration partition nemesis lint format analysis staleness clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)

$(SERVICE_STAMP): requirements.txt pyproject.toml | $(PY)
	@echo "== installing the service's packages into $(VENV) (once; make test adds the test tools)"
	@sed '/^# -- not in the image/,$$d' requirements.txt > $(VENV)/service-requirements.txt
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -r $(VENV)/service-requirements.txt
	@# The project itself, editable: puts the kvctl command in $(VENV)/bin.
	$(PY) -m pip install --disable-pip-version-check --quiet --no-deps -e .
	@touch $@

$(STAMP): requirements.txt requirements-dev.txt $(SERVICE_STAMP)
	@echo "== installing the test, study and lint tools into $(VENV) (once)"
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -r requirements-dev.txt
	@touch $@

## run: start a local cluster (leader on 8000, five followers on 8001-8005); TLS=1: HTTPS
run: $(SERVICE_STAMP)
	$(PY) tools/cluster.py $(if $(filter-out 0,$(TLS)),--tls) $(ARGS)

## certs: a private CA and a certificate per node in certs/ (tools/certs.py)
certs: $(SERVICE_STAMP)
	$(PY) tools/certs.py $(ARGS)

## run-ha: a private etcd and six HA nodes on 8000-8005 that elect their leader (needs etcd-server); TLS=1
run-ha: $(SERVICE_STAMP)
	$(PY) tools/cluster.py --ha $(if $(filter-out 0,$(TLS)),--tls) $(ARGS)

## failover: 20 leader kills under load, timed by the client (ARGS="--fault term" for hand-overs)
failover: $(STAMP)
	$(PY) benchmarks/failover.py $(ARGS)

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

## partition: HA nodes and etcd in network namespaces, cut and slowed (tests/partition; root, iproute2, nftables)
partition: $(STAMP)
	$(PY) -m pytest tests/partition $(ARGS)

## nemesis: random faults against a real cluster, then a history check (ARGS="--seconds 600 --seed N"; --ha: HA nodes and etcd; --net: HA nodes in namespaces, partitions too, a linearizability check; root)
nemesis: $(STAMP)
	$(PY) tools/nemesis.py $(ARGS)

## docs: build the documentation site into site/, strictly (a broken link or page fails)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

## docs-serve: serve the site on http://127.0.0.1:8008, rebuilt as docs/ changes
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8008

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

## staleness: how often a follower read is stale t ms after a write, against PBS's prediction
staleness: $(STAMP)
	$(PY) tools/staleness.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
