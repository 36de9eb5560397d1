PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install bytecode clean kafka-jars

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

# The Kafka broker the tests start, from its jars on Maven Central: fetched once into a cache
# (Java and Maven needed; the tests that need a broker are skipped without them).
KAFKA_POM := tests/kafka/pom.xml
KAFKA_VERSION := $(shell sed -n 's:.*<kafka\.version>\(.*\)</kafka\.version>.*:\1:p' $(KAFKA_POM))
DIGITSTREAM_KAFKA_JARS ?= $(HOME)/.cache/digitstream/kafka-$(KAFKA_VERSION)
# named by the pom's content, not its time: a fresh checkout fetches nothing again
KAFKA_STAMP := $(DIGITSTREAM_KAFKA_JARS)/.fetched-$(shell sha256sum $(KAFKA_POM) | cut -c1-16)

kafka-jars: $(KAFKA_STAMP)

$(KAFKA_STAMP):
	mvn -B -q -f $(KAFKA_POM) dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory='$(DIGITSTREAM_KAFKA_JARS)'
	touch '$@'

bench: bytecode
	$(BIN)/digitstream bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache test-artifacts
