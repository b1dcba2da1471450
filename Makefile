# Two set-up commands for a fresh clone (see README): `make run` and `make test`.
# Paths are relative to this Makefile, so `make -f path/to/Makefile run` works from any folder
# (the README test runs `make run` that way, writing runs/ in its own folder).
ROOT := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
PYTHON ?= python3
VENV ?= $(ROOT).venv
PY := $(VENV)/bin/python
# Extra `cmai quickstart` flags, e.g. QUICKSTART_ARGS="--timesteps 512 --n-envs 4 --seeds 0 1" for a quick look.
QUICKSTART_ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: venv run test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(ROOT)pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '$(ROOT)[test]'
	touch $@

# The main job on the embedded default backbone.
run: venv
	$(VENV)/bin/cmai quickstart $(QUICKSTART_ARGS)

# The whole test suite (slow end-to-end tests included only when CMAI_SLOW=1), on TEST_WORKERS
# pytest-xdist processes (one per core of the 2-core CI machine; tests pin torch to one thread).
# `--dist loadfile` keeps each file on one worker, in order (the README test's commands build on
# each other in one folder); `--no-loadscope-reorder` hands files out in collection order, where
# tests/conftest.py puts the longest file first.
TEST_WORKERS ?= 2
test: venv
	cd $(ROOT) && $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: venv
	$(PY) $(ROOT)benchmarks/attacks.py
	$(PY) $(ROOT)benchmarks/env_throughput.py

clean:
	rm -rf $(VENV) $(ROOT)build $(ROOT)dist $(ROOT)*.egg-info $(ROOT).pytest_cache
