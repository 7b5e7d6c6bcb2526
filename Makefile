# Two entry points: `make repro` runs the pipeline on the embedded default, `make test` runs the tests.
# Both create .venv (Python 3.11) and install requirements.txt on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro test lint bench clean-artifacts

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: $(STAMP)
	dvc repro
	@cat artifacts/metrics/table.md

test: $(STAMP)
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo 'pytest collected no tests' >&2; fi; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check unseg stages tests benchmarks
	$(VENV)/bin/ruff format --check unseg stages tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean-artifacts:
	rm -rf artifacts/* data/prepared
