# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Everything installs into .venv from pinned versions in constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080
# The browser test drives the distribution's Chromium (Playwright never downloads a browser).
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test lint bench clean venv browser postgresql

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/flare-cds serve --host $(HOST) --port $(PORT)

# Installs Chromium when it is missing and this is a Debian machine we may change (root, as CI
# is); otherwise it says what to run, and the browser test fails with the same command.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "Chromium is missing: run 'sudo apt-get install -y chromium'"; \
	  fi; \
	fi

# The tests run a throwaway PostgreSQL server of their own; this installs its programs if missing.
postgresql:
	.ci/install-postgresql

test: $(STAMP) browser postgresql
	$(BIN)/ruff check service tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
