# The two commands of the README, and the checks.
#   make serve   set up (first time) and run the gateway on the default model
#   make test    set up (first time) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test lint setup system-deps node-deps

# Root runs apt-get itself; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# What the tests drive besides Python, from Debian when missing: kubectl renders the
# Kubernetes manifests (tests/test_deploy.py), Chromium runs the status page's browser
# test (tests/test_ui_browser.py). A machine without apt-get fails here, loudly.
system-deps:
	@command -v kubectl >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q kubernetes-client; }
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The Node SDK test (tests/gateway/test_responses_node.py): node and npm from Debian when
# missing, then the openai package as tests/node/package-lock.json pins it.
node-deps:
	@command -v npm >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
	@[ -d tests/node/node_modules/openai ] || npm ci --prefix tests/node --no-audit --no-fund -q

serve: $(VENV)/.installed
	$(VENV)/bin/gateway serve

# The checks first (ruff, format, strict mypy), then the suite, with a Redis on
# 127.0.0.1:6379 (started for the run when none answers). pytest exits 5 when it collects
# no tests: not a failure of the code under test.
test: lint system-deps node-deps
	bash scripts/with-redis $(VENV)/bin/pytest -q -p no:cacheprovider; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
