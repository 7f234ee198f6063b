#!/usr/bin/env bash
# Usage: scripts/check-ports.sh --compose VARIABLE ...          (make up)
#        scripts/check-ports.sh --container NAME VARIABLE ...   (make postgresDBContainer)
# Before Docker publishes ports on 127.0.0.1: each VARIABLE names a port, its value taken from
# the environment (Make passes the values it read from .env). When something already listens
# on one, says in one line which port and which .env variable to change, and exits 1.
# Ports that the stack (--compose: this project's containers) or the container NAME already
# publish are fine: `make up` on a running stack changes nothing.
set -o errexit -o nounset -o pipefail

case ${1:-} in
    --compose) ours=$(docker compose ps --format '{{range .Publishers}}{{.PublishedPort}} {{end}}' 2>/dev/null || :)
        shift ;;
    --container) ours=$(docker port "${2:?--container needs a NAME}" 2>/dev/null | sed -n 's/.*:\([0-9]*\)$/\1/p' || :)
        shift 2 ;;
    *) echo "Usage: scripts/check-ports.sh --compose VARIABLE ... | --container NAME VARIABLE ..." >&2
        exit 2 ;;
esac
# shellcheck disable=SC2086  # word splitting puts the ports on one line
ours=" $(echo $ours) "

for variable in "$@"; do
    port=${!variable:-}
    if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
        echo "$variable=$port is not a port number: set $variable in .env to a free port (1-65535)." >&2
        exit 1
    fi
    [[ $ours == *" $port "* ]] && continue
    # A connection that succeeds means a listener holds the port.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "Port $port on 127.0.0.1 is already in use: set $variable in .env to a free port, or stop what listens there." >&2
        exit 1
    fi
done
