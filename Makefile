# Two commands on a fresh machine:  make demo  (train + audit the embedded default)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 are the pair that import together here (CPU is fine).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# The oldest torch pyproject claims (torch>=2.9), with its torchvision: `make test-oldest` runs the
# whole suite there too (why not older: wssi_audit/frontends/torch_support.py).
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH_PINS ?= torch==2.9.0 torchvision==0.24.0

.PHONY: install demo test test-oldest lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q $(TORCH_PINS) -e ".[test,zoo,integrations]"
	touch $@

install: $(VENV)/.installed

$(OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q $(OLDEST_TORCH_PINS)
	$(OLDEST_VENV)/bin/pip install -q -e ".[test,zoo,integrations]" $(OLDEST_TORCH_PINS)
	touch $@

demo: install
	$(BIN)/wssi-audit demo --output-dir demo_out

lint: install
	$(BIN)/ruff check wssi_audit tests benchmarks examples
	$(BIN)/ruff format --check wssi_audit tests benchmarks examples

test: install lint
	$(BIN)/pytest

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest

bench: install
	$(BIN)/python benchmarks/audit_speed.py
	$(BIN)/python benchmarks/regularizer_overhead.py

clean:
	rm -rf demo_out .pytest_cache .hypothesis
