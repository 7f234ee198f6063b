#!/usr/bin/env bash
# Usage: scripts/entrypoint.sh COMMAND [ARGS...]
# The container's entrypoint: checks POSTGRES_PASSWORD, waits until the database answers (at
# most DB_WAIT_TIMEOUT seconds, default 60), then replaces itself with COMMAND (gunicorn by
# default).
set -o errexit -o nounset -o pipefail

# docker-compose.yml pastes POSTGRES_PASSWORD into DATABASE_URL as it is (compose cannot
# URL-encode it): a / # @ ? or % there would make the URL say something else.
if [[ ${POSTGRES_PASSWORD:-} =~ [^A-Za-z0-9._~-] ]]; then
    echo "POSTGRES_PASSWORD has characters a database URL cannot hold as they are: set POSTGRES_PASSWORD in .env to URL-safe characters only (letters, digits, - . _ ~), e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))' (a database volume keeps the password it was first started with: see .env.example)." >&2
    exit 1
fi

cd "$(dirname "$0")/.."
python manage.py wait_for_db --timeout "${DB_WAIT_TIMEOUT:-60}"
exec "$@"
