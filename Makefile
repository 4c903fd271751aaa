# The two commands the README starts with:
#   make demo   run falhook end to end on the embedded default (SQLite), offline
#   make test   lint, type-check and run the whole test suite
# Both create .venv and install what they need on first use: `make demo` only what
# running falhook needs (its runtime dependencies), `make test` the dev tools as well.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install install-runtime demo test lint typecheck pytest bench docs clean

install: $(STAMP)

install-runtime: $(RUNTIME_STAMP)

# A current dev install (`make test`) already holds everything the runtime one would.
$(RUNTIME_STAMP): pyproject.toml
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then touch $@; else \
		$(PYTHON) -m venv $(VENV) && \
		$(BIN)/python -m pip install --quiet -e . && \
		touch $@; \
	fi

# The dev install includes the runtime one, so it satisfies `make demo` too.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,docs]'
	touch $(STAMP) $(RUNTIME_STAMP)

demo: install-runtime
	$(BIN)/falhook demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

bench: install
	$(BIN)/python -m bench

# The documentation site, into site/ (the test suite builds it too, strictly).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site
