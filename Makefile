# Two environments, each installed from its lock file (every package pinned, hash-checked):
#   .venv      requirements.lock      (jax stack + dev tools; the project in editable mode)
#   .venv-fhe  requirements-fhe.lock  (concrete-ml with its own numpy 1.26 / torch 2.3.1 pins)
# Each is rebuilt only when its lock file (or the Python) changes. `make lock` regenerates the
# locks from pyproject.toml / requirements-fhe.txt (with uv); `make venv` refuses a lock that is
# out of date with its spec (scripts/check_lock.py).
PYTHON ?= python3
VENV := .venv
FHE_VENV := .venv-fhe
PYTEST_ARGS ?=
LOCK_ARGS ?=

.PHONY: demo test test-main test-fhe test-slow venv venv-fhe lock clean

venv:
	PYTHON=$(PYTHON) scripts/ensure_venv.sh $(VENV) requirements.lock .

venv-fhe:
	PYTHON=$(PYTHON) scripts/ensure_venv.sh $(FHE_VENV) requirements-fhe.lock

# Regenerates requirements.lock and requirements-fhe.lock (keeps current pins where it can);
# e.g. LOCK_ARGS='-- --upgrade-package jax' or LOCK_ARGS=fhe. See scripts/lock.sh.
lock:
	PYTHON=$(PYTHON) scripts/lock.sh $(LOCK_ARGS)

# The main job: every registered experiment's smoke config, one summary table.
demo: venv venv-fhe
	$(VENV)/bin/python -m experiments.demo

# Every test suite: the jax suite in .venv, the FHE suite in .venv-fhe.
test: test-main test-fhe

test-main: venv venv-fhe
	$(VENV)/bin/python -m pytest tests --ignore=tests/fhe $(PYTEST_ARGS)

test-fhe: venv-fhe
	PYTHONPATH=. $(FHE_VENV)/bin/python -m pytest tests/fhe -p no:cacheprovider $(PYTEST_ARGS)

# The slow end-to-end cases (left out of the runs above), in both environments. A later -m on
# the command line overrides pyproject's addopts "-m 'not slow'". Exit status 5 (no test
# selected: a suite with no slow case) counts as success.
test-slow: venv venv-fhe
	$(VENV)/bin/python -m pytest tests --ignore=tests/fhe -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]
	PYTHONPATH=. $(FHE_VENV)/bin/python -m pytest tests/fhe -p no:cacheprovider -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) $(FHE_VENV) runs .pytest_cache
