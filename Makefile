# Two environments: .venv (jax stack, the project in editable mode) and .venv-fhe (concrete-ml
# with its own numpy 1.26 / torch 2.3.1 pins). Each is rebuilt only when its spec file changes.
PYTHON ?= python3
VENV := .venv
FHE_VENV := .venv-fhe
PYTEST_ARGS ?=

.PHONY: demo test test-main test-fhe venv venv-fhe clean

venv:
	PYTHON=$(PYTHON) scripts/ensure_venv.sh $(VENV) pyproject.toml -- -e '.[dev]'

venv-fhe:
	PYTHON=$(PYTHON) scripts/ensure_venv.sh $(FHE_VENV) requirements-fhe.txt -- -r requirements-fhe.txt

# The main job: every registered experiment's smoke config, one summary table.
demo: venv venv-fhe
	$(VENV)/bin/python -m experiments.demo

# Every test suite: the jax suite in .venv, the FHE suite in .venv-fhe.
test: test-main test-fhe

test-main: venv venv-fhe
	$(VENV)/bin/python -m pytest tests --ignore=tests/fhe $(PYTEST_ARGS)

test-fhe: venv-fhe
	PYTHONPATH=. $(FHE_VENV)/bin/python -m pytest tests/fhe -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(FHE_VENV) runs .pytest_cache
