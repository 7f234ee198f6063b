#!/usr/bin/env bash
# Usage: scripts/require-docker.sh
# Exits 0 when a Docker engine answers `docker info` within DOCKER_INFO_TIMEOUT seconds (default
# 20); otherwise says so in one line and exits 1. The Docker Make targets call it first, so an
# engine that hangs ends them in one line instead of hanging them all.
set -o errexit -o nounset
without="Without it, use the SQLite default (unset DATABASE_URL) or point DATABASE_URL at any PostgreSQL server."
if ! command -v docker >/dev/null 2>&1; then
    echo "Docker is not installed. $without" >&2
    exit 1
fi
wait=${DOCKER_INFO_TIMEOUT:-20}
status=0
timeout --kill-after=5 "$wait" docker info >/dev/null 2>&1 || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "The Docker engine did not answer \`docker info\` within $wait s: restart it (or check DOCKER_HOST). $without" >&2
    exit 1
elif [ "$status" -ne 0 ]; then
    echo "No Docker engine is running here. $without" >&2
    exit 1
fi
