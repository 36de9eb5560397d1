PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install bytecode clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dask,test]'
	touch $(STAMP)

install: $(STAMP)

# The package is installed editable, so pip writes no bytecode for it; without it each
# process compiles the modules it imports (0.1 s of every start here).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q src

demo: bytecode
	$(BIN)/digitstream demo

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: bytecode
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src
	$(BIN)/mypy

bench: bytecode
	$(BIN)/digitstream bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache test-artifacts
