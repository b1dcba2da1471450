# Two set-up commands for a fresh clone (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: venv run test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job on the embedded default backbone.
run: venv
	$(VENV)/bin/cmai quickstart

# The whole test suite (slow end-to-end tests included only when CMAI_SLOW=1).
test: venv
	$(PY) -m pytest -q -ra

bench: venv
	$(PY) benchmarks/attacks.py
	$(PY) benchmarks/env_throughput.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
