#!/usr/bin/env bash
# Usage: scripts/check-ports.sh --compose VARIABLE ...          (make up)
#        scripts/check-ports.sh --container NAME VARIABLE ...   (make postgresDBContainer)
# Before Docker publishes ports on 127.0.0.1: each VARIABLE names a port, its value taken from
# the environment (Make passes the values it read from .env). When something already listens
# on one, says in one line which port and which .env variable to change, and exits 1.
# Ports that the stack (--compose: this project's containers) or the container NAME already
# publish are fine: `make up` on a running stack changes nothing. With --container, a container
# NAME that exists (running or stopped) must publish VARIABLE's port: it keeps the ports it was
# created with, so `docker start` would put it elsewhere than .env says.
set -o errexit -o nounset -o pipefail

container=
case ${1:-} in
    --compose) ours=$(docker compose ps --format '{{range .Publishers}}{{.PublishedPort}} {{end}}' 2>/dev/null || :)
        shift ;;
    --container) container=${2:?--container needs a NAME}
        # The host ports it was created with, running or not; nothing when there is no such container.
        ours=$(docker inspect --format '{{range $p, $b := .HostConfig.PortBindings}}{{range $b}}{{.HostPort}} {{end}}{{end}}' \
               "$container" 2>/dev/null) || container=
        shift 2 ;;
    *) echo "Usage: scripts/check-ports.sh --compose VARIABLE ... | --container NAME VARIABLE ..." >&2
        exit 2 ;;
esac
# shellcheck disable=SC2086  # word splitting puts the ports on one line
published=$(echo $ours)
ours=" $published "

for variable in "$@"; do
    port=${!variable:-}
    if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
        echo "$variable=$port is not a port number: set $variable in .env to a free port (1-65535)." >&2
        exit 1
    fi
    [[ $ours == *" $port "* ]] && continue
    if [ -n "$container" ]; then
        echo "The container $container publishes ${published:+127.0.0.1:}${published:-no port}, not $variable=$port: ${published:+set $variable=${published%% *} in .env, or }remove the container (docker rm $container; its data stays in its volume)." >&2
        exit 1
    fi
    # A connection that succeeds means a listener holds the port.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "Port $port on 127.0.0.1 is already in use: set $variable in .env to a free port, or stop what listens there." >&2
        exit 1
    fi
done
