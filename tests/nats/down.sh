#!/usr/bin/env bash
# Stops the NATS cluster that up.sh started in STATE_DIR (only its own processes, by PID).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${1:?usage: down.sh STATE_DIR}
source "$here/../controlplane/lib.sh"
stop nats-1 nats-2 nats-3
