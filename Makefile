# The README's two commands: `make demo` (main job) and `make test` (full suite).
# Each creates .venv when missing and installs what it needs. TORCH pins the CPU build that these
# machines carry; on a GPU machine use e.g. `make demo TORCH='torch>=2.9'`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q '$(TORCH)'
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: setup demo test test-quick
setup: $(STAMP)

# extra overrides for the demo, e.g. make demo DEMO_ARGS="launcher.nproc_per_node=2"
DEMO_ARGS ?=

demo: $(STAMP)
	$(VENV)/bin/distrain train recipe=qwen3_moe_debug launcher.nproc_per_node=2 parallel.ep=2 $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"
