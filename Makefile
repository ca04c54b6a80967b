# Two commands on a fresh machine: `make repro` runs the study, `make test` runs the tests.
# Both build the virtual environment first when it is missing or pyproject.toml changed.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Extra package index for PyTorch, e.g. https://download.pytorch.org/whl/cpu for CPU-only wheels.
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install repro test test-slow test-all lint ui

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[dev]'
	touch $@

repro: install
	PATH="$(BIN):$$PATH" dvc repro

# `make test` is the default suite, the one CI runs: every test but those marked `slow` (they train for several
# epochs, kill and resume the grid, or run whole DVC pipelines; README "CI"). `make test-slow` runs those,
# `make test-all` both. A later `-m` in PYTEST_ARGS replaces the suite's. pytest exits 5 when it collected
# nothing: that is a broken test run, not a pass.
PYTEST = @PATH="$(BIN):$$PATH" pytest $(1) $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing the run" >&2; exit 1; fi; \
	exit $$status

test: install
	$(call PYTEST,-m "not slow")

test-slow: install
	$(call PYTEST,-m slow)

test-all: install
	$(call PYTEST,)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The reduced pipeline of CI and smoke runs: the same dvc.yaml, every variant, one seed, 10,000 training images
# (100 per class), 1,000 validation images, 2 epochs, convolutions 24 channels wide instead of 32 ((24/32)^2 = 56%
# of their arithmetic): the cheapest profile measured in which the guard's accuracy claim holds over three seeds as
# firmly as at full width (benchmarks/guard_margins.py, README "The report"). `dvc exp run -S` records it as a DVC
# experiment and writes these values into params.yaml; `git checkout params.yaml` returns to the full study.
# With it, the depth sweep's (defined first: `:=` expands at once): three depths (8, 20 and 56 layers), plain and
# residual networks, one epoch on 2,000 images; `guard --sweep` checks its claim (the plain networks' entry-layer
# gradient falls with depth, the residual ones' does not; README "A depth sweep").
SWEEP_REDUCED := -S 'sweep.families=[plain,residual]' -S 'sweep.blocks_per_stage=[0,2,8]' -S sweep.epochs=1 \
	-S sweep.subset.train=20
REDUCED := -S prepare.subset.train=100 -S prepare.subset.val=10 -S prepare.subset.test=10 -S train.epochs=2 \
	-S model.width=24 -S 'seeds=[0]' $(SWEEP_REDUCED)
# Offline: make reduced DATA=/abs/path/cifar-100-python.tar.gz (its md5 is computed and set with it).
DATA ?=
DATA_OVERRIDES = $(if $(DATA),-S data.url=$(abspath $(DATA)) -S data.md5=$$(md5sum $(DATA) | cut -d' ' -f1))

# EXP names the DVC experiment (CI compares `base` with `head`).
EXP ?=
.PHONY: reduced
reduced: install
	PATH="$(BIN):$$PATH" dvc exp run $(if $(EXP),-n $(EXP)) $(REDUCED) $(DATA_OVERRIDES)

# The MLflow UI on the embedded store (mlruns/), at http://127.0.0.1:5000. MLflow 3.17 opens experiments in GenAI
# mode until the user picks "Model training" (README "Compare the Table-1 runs in the UI").
ui: install
	@echo "MLflow UI: open http://127.0.0.1:5000 and pick 'Model training' at the top left (once per browser)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlruns)/mlflow.db --host 127.0.0.1 --port 5000
