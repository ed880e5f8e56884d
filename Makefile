# Two commands on a fresh machine: `make run` and `make test`. Both create the virtualenv on first
# use and reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/example.yaml
# Cache compiled modules even where the environment says not to (PYTHONDONTWRITEBYTECODE, set on
# the development machines): the tests start the engine and its CLI as processes a few hundred
# times, and each compiled the project's modules again (tests/test_admin.py: 48 s, 38 s cached).
export PYTHONDONTWRITEBYTECODE :=

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The example config reads the API token from MEDCOURIER_API_TOKEN. When it is not set, `make run`
# makes one on first use and keeps it in var/api-token (outside git), so the quick start needs no
# setup; `export MEDCOURIER_API_TOKEN=$$(cat var/api-token)` to use it with curl.
TOKEN_FILE := var/api-token

$(TOKEN_FILE):
	mkdir -p var
	umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(TOKEN_FILE)

run: $(STAMP) $(TOKEN_FILE)
	MEDCOURIER_API_TOKEN="$${MEDCOURIER_API_TOKEN:-$$(cat $(TOKEN_FILE))}" $(BIN)/medcourier run --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check medcourier tests bench
	$(BIN)/mypy
	$(BIN)/mypy bench
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check medcourier tests bench
	$(BIN)/ruff format --check medcourier tests bench
	$(BIN)/mypy
	$(BIN)/mypy bench

bench: $(STAMP)
	$(BIN)/python bench/e2e_send_to_ehr.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
	find medcourier tests bench -name __pycache__ -prune -exec rm -rf {} +
