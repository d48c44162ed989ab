# The README's two commands: `make compare` (the main job) and `make test`.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: compare test benchmark tune clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[experiments,test]"
	touch $(STAMP)

compare: $(STAMP)
	$(BIN)/python -m experiments.compare --model mlp --optimizers sofim,kfac,sgdm,adam --epochs 10 --out runs/compare

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

benchmark: $(STAMP)
	$(BIN)/python -m experiments.benchmark_step_time --models mlp,cnn

tune: $(STAMP)
	$(BIN)/python -m experiments.tune --model mlp --epochs 3 --optimizers sofim,kfac,sgdm,adam

clean:
	rm -rf $(VENV) runs build *.egg-info
