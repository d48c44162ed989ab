# The README's two commands: `make compare` (the main job) and `make test`.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: compare test test-slow lint benchmark tune clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[experiments,test]"
	touch $(STAMP)

compare: $(STAMP)
	$(BIN)/python -m experiments.compare --out runs/compare

# The fast suite; the few real convergence runs and the notebook executions are marked
# `slow` and run by `make test-slow` (CI runs both).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow

lint: $(STAMP)
	$(BIN)/ruff check sofim_optax experiments tests
	$(BIN)/ruff format --check sofim_optax experiments tests

benchmark: $(STAMP)
	$(BIN)/python -m experiments.benchmarks.step_time --models mlp,cnn

tune: $(STAMP)
	$(BIN)/python -m experiments.classify --optimizers sofim,kfac,sgdm,adam --grid --epochs 3 --out runs/tune

clean:
	rm -rf $(VENV) runs build *.egg-info
