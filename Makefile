# Two entry points for a fresh machine with only Python and pip:
#   make demo   set up .venv and run the main job (maskpack bench on the embedded default)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The tested torch/torchvision pair, installed before the package. pyproject.toml keeps ranges
# (torch>=2.2); set TORCH_PINS to install another pair.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint mutation clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/maskpack bench

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check maskpack tests bench

# Mutation testing of the storage and loading code (about half an hour on 2 cores; not in CI).
mutation: setup
	$(PY) -m pip install -q 'mutmut>=3.2,<4'
	bash bench/mutation.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mutation
