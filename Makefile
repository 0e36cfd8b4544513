PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test-env test test-fast lint bench secrets compose-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/tuneserve dev

# Packages (Chromium, PostgreSQL, Redis), servers on 127.0.0.1: everything the tests need but the venv.
test-env:
	.ci/setup.sh

test: test-env install
	$(PY) -m pytest -q

test-fast: test-env install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/train.py
	$(PY) bench/ingest.py
	$(PY) bench/predict.py

# docker compose: ./secrets/postgres_password (random, kept if present) and ./secrets/api_keys (empty: open).
# The directory is 0700; the files 0644, because compose bind-mounts them as they are and the app is uid 10001.
secrets:
	install -d -m 700 secrets
	test -s secrets/postgres_password || (umask 022; $(PYTHON) -c "import secrets; print(secrets.token_hex(24))" > secrets/postgres_password)
	test -e secrets/api_keys || (umask 022; : > secrets/api_keys)
	chmod 644 secrets/postgres_password secrets/api_keys

# Builds the stand-in images and ours, runs the compose stack (CPU) for real: needs root and Docker.
compose-smoke:
	bench/compose-smoke.sh

clean:
	rm -rf var .pytest_cache test-artifacts
