# robust-ensembles: `make demo` runs the service end to end; `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := postgresql dataset-fashion-mnist docker.io docker-compose debootstrap chromium
PYTEST_ARGS ?=
# Tests run in two pytest-xdist processes, a test file per process at a time (--dist loadfile keeps a file's
# module fixtures in one process); each process has its own PostgreSQL and Ray. The serial suite leaves about
# one of the two cores idle (waits on Ray start-up, job polling, leases, subprocesses): measured quiet, 30.3 min
# serial against 19.2 min with two processes. TEST_WORKERS=0 runs serially in one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

.PHONY: install test test-fast test-unit demo bench lint compose-check cluster-test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt requirements-nodeps.txt
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; fi; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -p no:cacheprovider $(XDIST) --durations=30 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# The fast tier: the unit tests and the quickest integration tests (real Postgres and the API, the built
# wheel; no Ray jobs), without the tests marked slow (real-MNIST training, DDP equivalence, `up` from the
# wheel). Under 3 minutes on two quiet cores; `make test` runs everything.
FAST_TESTS := tests/unit tests/integration/test_api.py tests/integration/test_queue.py \
  tests/integration/test_security.py tests/integration/test_webhooks.py tests/integration/test_wheel.py

test-fast: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -p no:cacheprovider $(XDIST) -m "not slow" $(FAST_TESTS) $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-unit: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/robust-ensembles demo

bench: install
	$(PY) -m bench

# Validates docker-compose.yml with the documented .env.example (no Docker engine needed).
compose-check:
	docker-compose --env-file .env.example config -q
	docker-compose --env-file .env.example --profile gpu config -q

# The compose cluster built from this checkout and run for real (docker/cluster_test.py): base images from
# Debian packages, the project image, a 2-worker DDP train job and an evaluate job over the published port,
# a Ray worker node killed mid-training; torn down with its volumes. Starts dockerd if none runs (root).
cluster-test: install
	$(PY) docker/cluster_test.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
