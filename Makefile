# Every target installs what it needs first: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CODEX_VERSION ?= 0.169.0
CODEX_DIR := .tools/codex
CODEX := $(CODEX_DIR)/node_modules/.bin/codex
HOST ?= 127.0.0.1
PORT ?= 8787

.PHONY: install codex test lint format demo serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The real Codex CLI for the end-to-end tests, pinned, in a folder this Makefile owns.
codex: $(CODEX)

$(CODEX):
	mkdir -p $(CODEX_DIR)
	cd $(CODEX_DIR) && npm install --no-audit --no-fund --loglevel=error @openai/codex@$(CODEX_VERSION)
	test -x $(CODEX)

test: install codex
	TRIOPROXY_CODEX_BIN="$(abspath $(CODEX))" $(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check trioproxy tests bench
	$(VENV)/bin/ruff format --check trioproxy tests bench
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format trioproxy tests bench
	$(VENV)/bin/ruff check --fix trioproxy tests bench

demo: install
	$(PY) -m trioproxy.demo

serve: install
	$(VENV)/bin/trioproxy serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
