# The README's two commands: `make compare` (the main job) and `make test`.
# Both create the virtual environment in .venv on first use. `make docs` builds the site
# (docs/_build/html) and `make doctest` runs the docstring examples.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: compare test test-slow lint doctest docs benchmark tune clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[experiments,test]"
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

compare: $(STAMP)
	$(BIN)/python -m experiments.compare --out runs/compare

# The fast suite; the few real convergence runs and the notebook executions are marked
# `slow` and run by `make test-slow` (CI runs both).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow

# The examples (`>>>`) in the library's docstrings and the code on the documentation pages
# (tests/test_docs_examples.py, marked slow); not part of `make test`.
doctest: $(STAMP)
	$(BIN)/python -m pytest -q -p no:xdist --doctest-modules sofim_optax tests/test_docs_examples.py

# The documentation site, from scratch every time (-E), warnings as errors; no network. Where
# Fashion-MNIST is on the machine it also runs the notebooks at the small size (about 1.5
# minutes; cached in docs/_build/.jupyter_cache until the code changes).
docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -E -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check sofim_optax experiments tests
	$(BIN)/ruff format --check sofim_optax experiments tests

benchmark: $(STAMP)
	$(BIN)/python -m experiments.benchmarks.step_time --models mlp,cnn

tune: $(STAMP)
	$(BIN)/python -m experiments.classify --optimizers sofim,kfac,sgdm,adam --grid --epochs 3 --out runs/tune

clean:
	rm -rf $(VENV) runs build *.egg-info docs/_build docs/notebooks
