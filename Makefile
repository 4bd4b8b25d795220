# Every target installs what it needs first: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CODEX_VERSION ?= 0.169.0
CODEX_DIR := .tools/codex
CODEX := $(CODEX_DIR)/node_modules/.bin/codex
# nginx and HAProxy for the balancer tests, unpacked from Debian's packages (never installed).
BALANCERS_DIR := .tools/balancers
BALANCERS_DEBS := .tools/debs
BALANCERS_STAMP := $(BALANCERS_DIR)/.installed
HOST ?= 127.0.0.1
PORT ?= 8787
# The bench's own venv: LiteLLM and matplotlib stay out of the product's dependencies.
# LiteLLM 1.106.0 is the newest whose requirements resolve against this machine's package
# index (1.108 and later need certifi>=2026.10.19, which it does not have).
BENCH_VENV ?= .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_PROFILE ?= quick
LITELLM_VERSION ?= 1.106.0
# codex-lb in a venv of its own: it requires Python >= 3.13 (the machine's python3 is 3.11, so a
# plain `pip install codex-lb` finds no distribution); pyenv's 3.13 serves where no python3.13 is.
CODEX_LB_VENV ?= .bench-codex-lb
CODEX_LB_STAMP := $(CODEX_LB_VENV)/.installed
CODEX_LB_VERSION ?= 1.24.0
PYTHON313 ?= $(shell for p in python3.13 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python3.13; do "$$p" -c pass 2>/dev/null && echo "$$p" && break; done)

.PHONY: install codex balancers test lint format demo serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== installing trioproxy and its test tools into $(VENV) (about a minute the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The real Codex CLI for the end-to-end tests, pinned, in a folder this Makefile owns.
codex: $(CODEX)

$(CODEX):
	@echo "== installing the Codex CLI $(CODEX_VERSION) from npm into $(CODEX_DIR) (the end-to-end tests' client)"
	mkdir -p $(CODEX_DIR)
	cd $(CODEX_DIR) && npm install --no-audit --no-fund --loglevel=error @openai/codex@$(CODEX_VERSION)
	test -x $(CODEX)

# nginx and HAProxy from Debian's packages into $(BALANCERS_DIR) (binaries in usr/sbin): `apt-get
# download` and `dpkg-deb -x`, plus the shared libraries the machine lacks; no service starts.
# Refreshes empty or stale package lists first (as root). Without apt-get: skipped, or an error
# under CI.
balancers: $(BALANCERS_STAMP)

$(BALANCERS_STAMP): deploy/fetch-balancers.sh
	@echo "== unpacking nginx and HAProxy from Debian's packages into $(BALANCERS_DIR) (the balancer tests)"
	sh deploy/fetch-balancers.sh $(BALANCERS_DIR) $(BALANCERS_DEBS)
	@if [ -x $(BALANCERS_DIR)/usr/sbin/nginx ]; then touch $(BALANCERS_STAMP); fi

# The cancellation, fault and isolation suites run a second time with lanes on: sessions then
# share upstream sockets, and a cut or a fault must still reach only its own session.
LANES_SUITES = tests/test_cancellation.py tests/test_faults.py tests/test_managed.py

test: install codex balancers
	TRIOPROXY_CODEX_BIN="$(abspath $(CODEX))" $(VENV)/bin/pytest -q
	TRIOPROXY_TEST_LANES=1 $(VENV)/bin/pytest -q $(LANES_SUITES)

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

$(BENCH_STAMP): Makefile
	@echo "== installing LiteLLM $(LITELLM_VERSION) and matplotlib into $(BENCH_VENV) (a few minutes the first time)"
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check \
		'litellm[proxy]==$(LITELLM_VERSION)' 'matplotlib>=3.8,<4'
	touch $(BENCH_STAMP)

# Without a Python 3.13 the bench runs without codex-lb and its table says why.
$(CODEX_LB_STAMP): Makefile
	@if [ -z "$(PYTHON313)" ]; then \
		echo "codex-lb needs Python 3.13 and none was found: the bench leaves it out"; \
	else \
		{ test -x $(CODEX_LB_VENV)/bin/python || "$(PYTHON313)" -m venv $(CODEX_LB_VENV); } && \
		$(CODEX_LB_VENV)/bin/pip install -q --disable-pip-version-check \
			'codex-lb==$(CODEX_LB_VERSION)' && touch $(CODEX_LB_STAMP); \
	fi

# Every contender against one fake upstream in one run: a Markdown table, the targets,
# bench/results/latest.json and latest.png. BENCH_PROFILE=full for the long run.
bench: install $(BENCH_STAMP) $(CODEX_LB_STAMP)
	mkdir -p bench/results
	BENCH_VENV=$(BENCH_VENV) CODEX_LB_VENV=$(CODEX_LB_VENV) \
		$(PY) bench/run.py --profile $(BENCH_PROFILE)
	$(BENCH_VENV)/bin/python bench/plot.py bench/results/latest.json bench/results/latest.png

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(CODEX_LB_VENV) .tools .pytest_cache .mypy_cache .ruff_cache
