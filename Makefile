# Two commands do everything on a fresh clone:
#   make run    set up .venv and run the workflow on the generated demo data
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 8

.PHONY: setup run report test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[workflow,dev]"
	touch $@

run: setup
	$(BIN)/snakemake --profile profiles/default --cores $(CORES)

report: run
	$(BIN)/snakemake --profile profiles/default --cores $(CORES) --report results/report.html

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check src workflow/scripts tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks/runs resources/demo .snakemake
