# Two commands on a fresh machine: `make run` and `make test` do all the set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config/node.yaml
# The CPU build of torch; for NVIDIA GPUs see README ("GPU install").
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test install install-test peers lint typecheck bench bench-analysis bench-workers clean

run: $(VENV)/.installed
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

test: $(VENV)/.installed-test peers
	$(VENV)/bin/ruff check dicom_node tests bench
	$(VENV)/bin/mypy dicom_node bench
	$(PY) -m pytest --cov=dicom_node --cov-report=term --durations=25 $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# dcmtk (storescu, storescp, echoscu, findscu) and Orthanc are the real peers of the tests;
# headless chromium loads the dashboard as a person would; PostgreSQL and redis-server
# run the scale-out tests (each test starts its own on free ports, never the system service).
peers:
	@missing=""; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	{ command -v Orthanc >/dev/null 2>&1 || test -x /usr/sbin/Orthanc; } || missing="$$missing orthanc"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing test peers:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing test peers:$$missing; run as root or: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check dicom_node tests bench
	$(VENV)/bin/ruff format --check dicom_node tests bench

typecheck: $(VENV)/.installed-test
	$(VENV)/bin/mypy dicom_node bench

# Throughput against dcmtk storescp / storescu and Orthanc, study latency / memory / scaling
# (bench/README.md); about 10 minutes.
bench: $(VENV)/.installed-test
	$(PY) bench/receive.py && $(PY) bench/associations.py && $(PY) bench/send.py && $(PY) bench/study.py

# Analysis throughput with one and with two `dicom-node worker` processes (scale-out).
bench-workers: $(VENV)/.installed-test peers
	$(PY) bench/workers.py

# ct-chest stage times and peak memory (issue #3): phantom and the real Philips CT.
bench-analysis: $(VENV)/.installed-test
	$(PY) bench/analysis.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .coverage
