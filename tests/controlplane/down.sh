#!/usr/bin/env bash
# Stops the control plane that up.sh started in STATE_DIR (only its own processes, by PID).
set -uo pipefail
state=${1:?usage: down.sh STATE_DIR}
for name in kube-controller-manager kube-apiserver etcd; do
  pidfile="$state/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null && for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
done
