# Two commands on a fresh machine:  make demo  (train + audit the embedded default)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 are the pair that import together here (CPU is fine);
# any torch >= 2.4 works for the package itself.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q $(TORCH_PINS) -e ".[test,zoo,integrations]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/wssi-audit demo --output-dir demo_out

lint: install
	$(BIN)/ruff check wssi_audit tests benchmarks examples
	$(BIN)/ruff format --check wssi_audit tests benchmarks examples

test: install lint
	$(BIN)/pytest

bench: install
	$(BIN)/python benchmarks/audit_speed.py
	$(BIN)/python benchmarks/regularizer_overhead.py

clean:
	rm -rf demo_out .pytest_cache .hypothesis
