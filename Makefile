# Two commands on a fresh clone: `make run` serves, `make test` tests. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# Two test processes share the suite (most tests wait on workers, not on the CPU).
# Extra arguments: make test PYTEST_ARGS='-m "not faults and not browser and not bench"'
PYTEST_ARGS ?=

.PHONY: run test lint docs chromium clean

run: $(VENV)/.runtime
	$(BIN)/python scripts/run.py

test: $(VENV)/.dev lint chromium
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The documentation site, from docs/ and mkdocs.yml, into site/ (tests/test_docs_site.py builds it too).
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

chromium:
	scripts/ensure-chromium

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# requirements.txt lists ./client too: `make run` installs the `afterward` command line
# ($(BIN)/afterward), again whenever the client changes.
$(VENV)/.runtime: requirements.txt client/pyproject.toml $(wildcard client/afterward_client/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) var .pytest_cache site
