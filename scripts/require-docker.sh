#!/usr/bin/env bash
# Usage: scripts/require-docker.sh
# Exits 0 when a Docker engine answers; otherwise says so in one line and exits 1.
# The Docker Make targets call it first.
set -o errexit -o nounset
if ! command -v docker >/dev/null 2>&1; then
    echo "Docker is not installed. Without it, use the SQLite default (unset DATABASE_URL) or point DATABASE_URL at any PostgreSQL server." >&2
    exit 1
fi
if ! docker info >/dev/null 2>&1; then
    echo "No Docker engine is running here. Without it, use the SQLite default (unset DATABASE_URL) or point DATABASE_URL at any PostgreSQL server." >&2
    exit 1
fi
