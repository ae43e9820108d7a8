# make run   - agentd on embedded defaults (in-memory store, local echo agent, dev token)
# make test  - the whole test suite (Python and JavaScript) against real servers
# make bench - the benchmark suite (see docs/performance.md)

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)

.PHONY: run test lint bench system-deps

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test,agent]'
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(VENV)/bin/twistd --nodaemon --pidfile= agentd

system-deps:
	scripts/system-deps

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy agentd
	$(VENV)/bin/pytest
	node --test tests/js/

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy agentd

bench: $(STAMP) system-deps
	$(VENV)/bin/python -m bench
