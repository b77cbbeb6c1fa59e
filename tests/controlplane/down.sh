#!/usr/bin/env bash
# Stops the control plane that up.sh started in STATE_DIR (only its own processes, by PID).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${1:?usage: down.sh STATE_DIR}
source "$here/lib.sh"
stop kube-controller-manager kube-apiserver etcd
