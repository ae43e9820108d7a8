# make run   - agentd on embedded defaults (in-memory store, local echo agent, dev token)
# make test  - the whole test suite (Python and JavaScript) against real servers
# make bench - the benchmark suite and its charts (see docs/performance.md)

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
NPM_STAMP := clients/js/node_modules/.installed
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat setup.py | cksum | cut -d' ' -f1)

.PHONY: run test lint bench system-deps

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test,agent]'
	rm -f $(VENV)/.installed-* && touch $@

# The npm package's development dependencies, exactly as the lock file says.
$(NPM_STAMP): clients/js/package.json clients/js/package-lock.json
	cd clients/js && npm ci --no-audit --no-fund
	touch $@

run: $(STAMP)
	$(VENV)/bin/twistd --nodaemon --pidfile= agentd

system-deps:
	scripts/system-deps

test: $(STAMP) system-deps $(NPM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy agentd
	$(VENV)/bin/pytest
	node --test tests/js/
	cd clients/js && AGENTD_PYTHON=$(abspath $(VENV))/bin/python npm test

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy agentd

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test,agent,bench]'
	rm -f $(VENV)/.bench-installed-* && touch $@

bench: $(BENCH_STAMP) system-deps
	$(VENV)/bin/python -m bench
