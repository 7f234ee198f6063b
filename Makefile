# Make targets for the user-model migration reference app. `make` lists them.
# Every Python command goes through manage.py or scripts/, which turn a bad DATABASE_URL
# or a database that is down into one clear line.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
N ?= 10000
DIRTY ?= 0
-include .env
export

.DEFAULT_GOAL := help
.PHONY: help install demo test lint format check-migrations run migrate populate check-data \
        migrate-data backup restore bench-populate bench-migrate bench-backup \
        postgresDBContainer up down logs clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

install: $(VENV)/.installed ## Create .venv and install the pinned requirements

.env:
	@cp .env.example .env && echo "Created .env from .env.example (local development settings)."

demo: install .env ## Run the whole flow on a fresh database: populate, check, back up, migrate, log in
	$(PY) scripts/demo.py

test: install ## Run the test suite (PostgreSQL when DATABASE_URL is set, else SQLite)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install ## Lint and check formatting with ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## Format the code with ruff
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

check-migrations: install ## Fail when the models and the migrations disagree
	$(PY) manage.py makemigrations --check --dry-run

run: install ## Serve the app on http://127.0.0.1:8000 (development server)
	$(PY) manage.py migrate --no-input
	$(PY) manage.py runserver

migrate: install ## Apply all migrations (this includes the user copy, 0002)
	$(PY) manage.py migrate --no-input
