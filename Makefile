# Two commands on a fresh machine: `make repro` runs the study, `make test` runs the tests.
# Both build the virtual environment first when it is missing or pyproject.toml changed.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Extra package index for PyTorch, e.g. https://download.pytorch.org/whl/cpu for CPU-only wheels.
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install repro test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[dev]'
	touch $@

repro: install
	PATH="$(BIN):$$PATH" dvc repro

# pytest exits 5 when it collected nothing: that is a broken test run, not a pass.
test: install
	@PATH="$(BIN):$$PATH" pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing the run" >&2; exit 1; fi; \
	exit $$status

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
