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
POSTGRES_PORT ?= $(call dotenv,POSTGRES_PORT,5433)
PORT ?= $(call dotenv,PORT,8000)

.DEFAULT_GOAL := help
.PHONY: help install demo test lint format check-migrations run migrate populate check-data \
        migrate-data backup restore bench-populate bench-migrate bench-backup \
        cutover cutover-rollback demo-cutover bench-cutover \
        postgresDBContainer up down logs clean

help: ## List the targets and the variables they read (colour on a terminal only)
	@if [ -t 1 ]; then on=$$'\033[36m'; off=$$'\033[0m'; fi; \
	awk -v on="$$on" -v off="$$off" 'BEGIN {FS = ":.*## "} \
	    /^[a-zA-Z_-]+:.*## / {printf "  %s%-20s%s %s\n", on, $$1, off, $$2}' $(MAKEFILE_LIST); \
	echo; echo "Variables, as set now: N=$(N) DIRTY=$(DIRTY) SKIP_INVALID=$(or $(SKIP_INVALID),0)" \
	    "(change them per run: make populate N=1000000 DIRTY=0.05)"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

# A new .env gets its own random SECRET_KEY (settings refuse to start without one when DEBUG is
# off, which is the default) and POSTGRES_PASSWORD (URL-safe: docker-compose.yml puts it in a
# URL as it is), and mode 0600, since it holds them.
install: $(VENV)/.installed ## Create .venv, install the pinned requirements, create .env if missing (DEBUG off)
	@test -f .env || { \
	    key=$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(50))') && \
	    password=$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(24))') && \
	    (umask 077 && sed -e "s/^SECRET_KEY=.*/SECRET_KEY=$$key/" \
	        -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$$password/" .env.example > .env) && \
	    echo "Created .env from .env.example with a new random SECRET_KEY and POSTGRES_PASSWORD (DEBUG off)."; }

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

# Serving never migrates: `migrate` would run the copy (0002) without pre-flight and backup.
run: install ## Serve the app on http://127.0.0.1:8000 (development server, DEBUG on); only a fully migrated database
	@$(PY) manage.py check_migrated --verbosity 0
	DEBUG=$${DEBUG:-on} $(PY) manage.py runserver

migrate: install ## Apply all migrations (this includes the user copy, 0002)
	$(PY) manage.py migrate --no-input

# SKIP_INVALID=1: copy the valid legacy users and leave the rejected ones, listed in the report.
SKIP_ENV := $(if $(filter 1 on true yes,$(SKIP_INVALID)),USER_COPY_SKIP_INVALID=on,)

populate: install ## Add N fake legacy users (default N=10000; DIRTY=0.05 gives 5% defects, default DIRTY=0); migrates an empty database to the legacy schema first
	$(PY) manage.py populate_fake_user_bulk $(N) --dirty $(DIRTY) --migrate

check-data: install ## Pre-flight: list every legacy row the new schema cannot take (writes nothing)
	$(SKIP_ENV) $(PY) manage.py check_user_migration

# The pre-flight is a silent gate (-v 0: one line and the report only when it refuses); then
# the first copy is migration 0002, and every later run is a re-sync: one report, one summary.
migrate-data: install ## Pre-flight, backup, then copy or re-sync legacy users into NewUser (SKIP_INVALID=1 to leave bad rows behind)
	$(SKIP_ENV) $(PY) manage.py check_user_migration -v 0
	$(PY) scripts/backup.py
	@if $(PY) manage.py showmigrations account 2>/dev/null | grep -q '\[X\] 0002'; then \
	    echo "$(PY) manage.py migrate --no-input && $(SKIP_ENV) $(PY) manage.py copy_users"; \
	    $(PY) manage.py migrate --no-input -v 0 && $(SKIP_ENV) $(PY) manage.py copy_users; \
	else \
	    echo "$(SKIP_ENV) $(PY) manage.py migrate --no-input"; $(SKIP_ENV) $(PY) manage.py migrate --no-input; \
	fi

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
POSTGRES_VOLUME ?= accounts-pgdata
POSTGRES_IMAGE ?= postgres:15-bookworm

postgresDBContainer: ## Start PostgreSQL in Docker on 127.0.0.1:POSTGRES_PORT (settings from .env) and wait for it
	@scripts/require-docker.sh
	@POSTGRES_PORT="$(POSTGRES_PORT)" scripts/check-ports.sh --container $(POSTGRES_CONTAINER) POSTGRES_PORT
	@docker start $(POSTGRES_CONTAINER) >/dev/null 2>&1 || docker run -d --name $(POSTGRES_CONTAINER) \
	    -e POSTGRES_USER="$(POSTGRES_USER)" -e POSTGRES_PASSWORD="$(POSTGRES_PASSWORD)" \
	    -e POSTGRES_DB="$(POSTGRES_DB)" -p "127.0.0.1:$(POSTGRES_PORT):5432" \
	    -v $(POSTGRES_VOLUME):/var/lib/postgresql/data $(POSTGRES_IMAGE) >/dev/null
	@for i in $$(seq 60); do \
	    docker exec $(POSTGRES_CONTAINER) pg_isready -q -h 127.0.0.1 -U "$(POSTGRES_USER)" -d "$(POSTGRES_DB)" && \
	    { echo "PostgreSQL is ready: DATABASE_URL=postgres://$(POSTGRES_USER):…@127.0.0.1:$(POSTGRES_PORT)/$(POSTGRES_DB)"; exit 0; }; \
	    sleep 1; done; echo "PostgreSQL did not accept connections within 60 s: docker logs $(POSTGRES_CONTAINER)"; exit 1

up: ## Build and start the stack (db, web, and sync: the follower) with Docker Compose, wait until healthy, print the URL
	@scripts/require-docker.sh
	@PORT="$(PORT)" POSTGRES_PORT="$(POSTGRES_PORT)" scripts/check-ports.sh --compose PORT POSTGRES_PORT
	docker compose up -d --build --wait
	@echo "The stack is up: http://127.0.0.1:$(PORT)/ (make logs follows it, make down stops it)."

down: ## Stop the stack (the database, backups and reports volumes are kept)
	@scripts/require-docker.sh
	docker compose down

logs: ## Follow the stack's logs
	@scripts/require-docker.sh
	docker compose logs -f

clean: ## Remove the virtualenv and caches (never the database, backups or reports)
	rm -rf $(VENV) .pytest_cache .ruff_cache staticfiles
