# Make targets for the user-model migration reference app. `make` lists them.
# Every Python command goes through manage.py or scripts/, which turn a bad DATABASE_URL
# or a database that is down into one clear line.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
N ?= 10000
DIRTY ?= 0
# Django reads .env itself (the environment wins). Make reads only the Docker settings from it.
dotenv = $(or $(shell sed -n 's/^$(1)=//p' .env 2>/dev/null | tail -n 1),$(2))
POSTGRES_USER ?= $(call dotenv,POSTGRES_USER,postgres)
POSTGRES_PASSWORD ?= $(call dotenv,POSTGRES_PASSWORD,postgres)
POSTGRES_DB ?= $(call dotenv,POSTGRES_DB,accounts)
POSTGRES_PORT ?= $(call dotenv,POSTGRES_PORT,5432)

.DEFAULT_GOAL := help
.PHONY: help install demo test lint format check-migrations run migrate populate check-data \
        migrate-data backup restore bench-populate bench-migrate bench-backup \
        cutover cutover-rollback demo-cutover bench-cutover \
        postgresDBContainer up down logs clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

install: $(VENV)/.installed ## Create .venv, install the pinned requirements, create .env if missing
	@test -f .env || { cp .env.example .env && echo "Created .env from .env.example (local development settings, DEBUG on)."; }

demo: install ## Run the whole flow end to end: populate, pre-flight, back up, copy, log in (SQLite unless DATABASE_URL)
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

# SKIP_INVALID=1: copy the valid legacy users and leave the rejected ones, listed in the report.
SKIP_ENV := $(if $(filter 1 on true yes,$(SKIP_INVALID)),USER_COPY_SKIP_INVALID=on,)

populate: install ## Add N fake legacy users (N=10000, DIRTY=0.05 for defects); migrates an empty database to the legacy schema first
	$(PY) manage.py populate_fake_user_bulk $(N) --dirty $(DIRTY) --migrate

check-data: install ## Pre-flight: list every legacy row the new schema cannot take (writes nothing)
	$(SKIP_ENV) $(PY) manage.py check_user_migration

migrate-data: install ## Pre-flight, backup, then copy legacy users into NewUser + Profile (SKIP_INVALID=1 to leave bad rows behind)
	$(SKIP_ENV) $(PY) manage.py check_user_migration
	$(PY) scripts/backup.py
	$(SKIP_ENV) $(PY) manage.py migrate --no-input
	$(SKIP_ENV) $(PY) manage.py copy_users

backup: install ## Back up every account table to BACKUP_DIR (timestamped .jsonl.gz, mode 0600)
	$(PY) scripts/backup.py

restore: install ## Restore a backup: make restore FILE=backups/accounts-....jsonl.gz [ARGS=--replace|--dry-run]
	@test -n "$(FILE)" || { echo "Usage: make restore FILE=backups/accounts-<time>.jsonl.gz [ARGS=--replace]"; exit 2; }
	$(PY) scripts/restore.py "$(FILE)" $(ARGS)

# The cut-over (docs/cutover.md). Each refuses unless AUTH_USER_MODEL (environment or .env)
# names the model it switches to, so the command and the app started after it agree.
cutover: install ## Deploy 2 (AUTH_USER_MODEL=account.NewUser, old app stopped): switch the database to NewUser (ARGS=--dry-run)
	$(SKIP_ENV) $(PY) manage.py cutover $(ARGS)

cutover-rollback: install ## Undo the cut-over (AUTH_USER_MODEL=account.User, new app stopped), carrying NewUser's writes back (ARGS=--dry-run)
	$(SKIP_ENV) $(PY) manage.py cutover_rollback $(ARGS)

demo-cutover: install ## Show the cut-over end to end: deploy 1, sync, sign in, cut over, still signed in (SQLite unless DATABASE_URL)
	$(PY) scripts/demo_cutover.py

bench-populate: install ## Benchmark populate on PostgreSQL: make bench-populate N=1000000
	$(PY) bench/bench_populate.py $(N)

bench-migrate: install ## Benchmark the copy against INSERT ... SELECT: make bench-migrate N=1000000
	$(PY) bench/bench_migrate.py $(N)

bench-backup: install ## Benchmark backup/restore against dumpdata and COPY: make bench-backup N=1000000
	$(PY) bench/bench_backup.py $(N)

bench-cutover: install ## Benchmark the cut-over: N users, N orders, 1% changed: make bench-cutover N=1000000
	$(PY) bench/bench_cutover.py $(N)

POSTGRES_CONTAINER ?= accounts-postgres
POSTGRES_IMAGE ?= postgres:15-bookworm

postgresDBContainer: ## Start PostgreSQL in Docker (user, password, database, port from .env) and wait for it
	@scripts/require-docker.sh
	@docker start $(POSTGRES_CONTAINER) >/dev/null 2>&1 || docker run -d --name $(POSTGRES_CONTAINER) \
	    -e POSTGRES_USER="$(POSTGRES_USER)" -e POSTGRES_PASSWORD="$(POSTGRES_PASSWORD)" \
	    -e POSTGRES_DB="$(POSTGRES_DB)" -p "$(POSTGRES_PORT):5432" \
	    -v accounts-pgdata:/var/lib/postgresql/data $(POSTGRES_IMAGE) >/dev/null
	@for i in $$(seq 60); do \
	    docker exec $(POSTGRES_CONTAINER) pg_isready -q -U "$(POSTGRES_USER)" -d "$(POSTGRES_DB)" && \
	    { echo "PostgreSQL is ready: DATABASE_URL=postgres://$(POSTGRES_USER):…@127.0.0.1:$(POSTGRES_PORT)/$(POSTGRES_DB)"; exit 0; }; \
	    sleep 1; done; echo "PostgreSQL did not accept connections within 60 s: docker logs $(POSTGRES_CONTAINER)"; exit 1

up: ## Build and start the whole stack (db + web) with Docker Compose
	@scripts/require-docker.sh
	docker compose up -d --build --wait

down: ## Stop the stack (the database volume is kept)
	@scripts/require-docker.sh
	docker compose down

logs: ## Follow the stack's logs
	@scripts/require-docker.sh
	docker compose logs -f

clean: ## Remove the virtualenv and caches (never the database, backups or reports)
	rm -rf $(VENV) .pytest_cache .ruff_cache staticfiles
