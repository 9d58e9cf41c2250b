# Developer entry points. `make test` needs root for the real-sandbox tests
# (they skip with a reason otherwise); `make install` needs root.
PYTHON ?= python3
BUILD_DIR := build
# Runs vermin, the minimum Python version checker, from $(PYTHON).
VERMIN := $(PYTHON) -c 'import sys, vermin; sys.exit(vermin.main())'
SHELL_SCRIPTS := .ci/run tests/sandbox/ns-init.sh \
	tests/sandbox/ns-init-overlay.sh packaging/deb/build-deb.sh \
	packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm

.PHONY: test demo run bench lint deb install clean fuzz fuzz-in-namespace

test:
	@$(PYTHON) -c 'import pytest, hypothesis' 2>/dev/null \
		|| $(PYTHON) -m pip install pytest hypothesis
	@status=0; $(PYTHON) -m pytest -v -p no:cacheprovider tests/ || status=$$?; \
	if [ -n "$(PYTEST_STATUS_FILE)" ]; then echo $$status > "$(PYTEST_STATUS_FILE)"; fi; \
	exit $$status

demo:
	$(PYTHON) tests/demo.py

# Benchmarks against the real sandbox (root). Quick mode by default;
# BENCH_QUICK=0 runs the full mode. Writes the table to bench/results.md.
bench:
	BENCH_QUICK=$${BENCH_QUICK:-1} $(PYTHON) bench/run_bench.py

# The operator in the foreground with a development config under
# build/dev (written on first use; see tools/run_dev.py).
run:
	$(PYTHON) tools/run_dev.py $(BUILD_DIR)/dev

# ruff with ruff.toml, the Python 3.9 floor of the runtime code, shellcheck
# and systemd-analyze verify (which exits 0 on warnings, so any output fails).
lint:
	@$(PYTHON) -m ruff --version >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install ruff
	$(PYTHON) -m ruff check .
	@$(PYTHON) -c 'import vermin' 2>/dev/null || $(PYTHON) -m pip install vermin
	$(VERMIN) --target=3.9- --violations --eval-annotations --no-tips \
		crate_operator.py tools/run_dev.py
	@command -v shellcheck >/dev/null \
		|| { echo "shellcheck is missing: apt-get install shellcheck" >&2; exit 1; }
	shellcheck $(SHELL_SCRIPTS)
	@command -v systemd-analyze >/dev/null \
		|| { echo "systemd-analyze is missing: apt-get install systemd" >&2; exit 1; }
	@echo "systemd-analyze verify crate-operator.service"; \
	output=$$(systemd-analyze verify ./crate-operator.service 2>&1); \
	if [ -n "$$output" ]; then echo "$$output" >&2; exit 1; fi

# schemathesis against the development operator of `make run`.  The
# operator may only connect to loopback, but it resolves the host names of
# generated URLs before it checks them, and that asks the host's DNS
# resolver.  So both run in a new network namespace that has only a
# loopback interface (unshare; --map-root-user when not root).
fuzz:
	@command -v schemathesis >/dev/null \
		|| { echo "schemathesis is missing: pip install schemathesis" >&2; exit 1; }
	@command -v unshare >/dev/null \
		|| { echo "unshare is missing: apt-get install util-linux" >&2; exit 1; }
	@if [ "$$(id -u)" = 0 ]; then user_ns=; else user_ns=--map-root-user; fi; \
	unshare $$user_ns --net sh -c 'ip link set lo up && exec "$$@"' sh \
		$(MAKE) --no-print-directory fuzz-in-namespace

# The body of `make fuzz`, run inside its network namespace.
fuzz-in-namespace:
	@mkdir -p $(BUILD_DIR)
	@CRATE_OPERATOR_OUTBOUND_ALLOW='["127.0.0.0/8", "::1/128"]' \
	$(PYTHON) tools/run_dev.py $(BUILD_DIR)/dev > $(BUILD_DIR)/fuzz.log 2>&1 & \
	pid=$$!; sleep 2; \
	token=$$($(PYTHON) -c 'import json, sys; print(json.load(open(sys.argv[1]))["token"])' \
		$(BUILD_DIR)/dev/config.json); \
	schemathesis run http://127.0.0.1:8750/v1/openapi.json \
		-H "Authorization: Bearer $$token" --checks all; status=$$?; \
	kill $$pid; exit $$status

deb:
	PYTHON=$(PYTHON) OUT_DIR=$(abspath $(BUILD_DIR)) sh packaging/deb/build-deb.sh

install:
	$(PYTHON) crate_operator.py install

clean:
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis .ruff_cache .schemathesis $(BUILD_DIR)
