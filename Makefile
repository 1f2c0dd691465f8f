# cocoef — make targets. `make demo` and `make test` do the whole set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install tracking demo test baselines figures figures-quick bench mutate lint clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,lint]'
	$(BIN)/python -m compileall -q cocoef_cli hydra_plugins >/dev/null  # bytecode now, as pip does for wheels (start-up)
	touch $(STAMP)

# the loggers' packages alone (logger=tensorboard | mlflow; `make install` has them too, through the test extra)
tracking: install
	$(BIN)/pip install -q -e '.[tracking]'

demo: install
	$(BIN)/python -m cocoef_cli.demo --out runs/demo

# every method at the default setting, 3 seeds, as a resumable sweep; prints the final-metrics table
baselines: install
	$(BIN)/cocoef sweep baselines --out results/baselines

# the paper's figure set (experiments/*.yaml): resumable sweeps in runs/figures, figures + gallery in results/
figures: install
	$(BIN)/cocoef figures --jobs 2

figures-quick: install
	$(BIN)/cocoef figures --quick --jobs 2

# -n auto: one pytest-xdist worker per core
test: install
	$(BIN)/python -m pytest -n auto

# simulator vs per-device loop, vs a centralised step, seeds, scaling in M → results/bench.md
bench: install
	$(BIN)/cocoef bench --out results/bench.md

# mutation testing, not part of `make test` (~30-60 min on 2 cores): each mutation of tools/mutations.py
# alone in a scratch copy of the tree, its tests run there; kill rate and survivors → docs/mutation.md
mutate: install
	$(BIN)/python tools/mutate.py --jobs 2

# ruff (lint + format), mypy on the package, the import layers ([tool.ruff], [tool.mypy], [tool.importlinter] in pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
