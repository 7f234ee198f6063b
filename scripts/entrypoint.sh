#!/usr/bin/env bash
# Usage: scripts/entrypoint.sh COMMAND [ARGS...]
# The container's entrypoint: waits until the database answers (at most DB_WAIT_TIMEOUT
# seconds, default 60), then replaces itself with COMMAND (gunicorn by default).
set -o errexit -o nounset -o pipefail

cd "$(dirname "$0")/.."
python manage.py wait_for_db --timeout "${DB_WAIT_TIMEOUT:-60}"
exec "$@"
