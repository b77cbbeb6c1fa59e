#!/usr/bin/env bash
# Starts a 3-node NATS JetStream cluster on free loopback ports (the JetStream store's
# test engine, docs/engines.md). Usage: up.sh STATE_DIR. Each node keeps its data in
# STATE_DIR/nats-N, logs to STATE_DIR/nats-N.log, and records its PID and command line
# (STATE_DIR/nats-N.pid, .cmd: tests kill -9 a node and start it again from it). Appends
# HERALD_TEST_NATS_URLS (the three client URLs, comma-separated) to STATE_DIR/env. Stop it
# with down.sh STATE_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${1:?usage: up.sh STATE_DIR}
mkdir -p "$state" && state=$(cd "$state" && pwd)
bin=${HERALD_TOOLS_BIN:-$("$here/../controlplane/build-tools.sh")}
source "$here/../controlplane/lib.sh"

declare -a client cluster monitor
for n in 1 2 3; do client[n]=$(free_port); cluster[n]=$(free_port); monitor[n]=$(free_port); done
routes="nats-route://127.0.0.1:${cluster[1]},nats-route://127.0.0.1:${cluster[2]},nats-route://127.0.0.1:${cluster[3]}"
urls=""
for n in 1 2 3; do
  mkdir -p "$state/nats-$n"
  start "nats-$n" "$bin/nats-server" --server_name "herald-nats-$n" --addr 127.0.0.1 --port "${client[n]}" \
    --http_port "${monitor[n]}" \
    --jetstream --store_dir "$state/nats-$n" \
    --cluster_name herald-test --cluster "nats://127.0.0.1:${cluster[n]}" --routes "$routes"
  urls+="${urls:+,}nats://127.0.0.1:${client[n]}"
done

# Ready when every node's JetStream answers healthy (the meta group has a leader).
for n in 1 2 3; do
  python3 - "${monitor[n]}" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/healthz"
for _ in range(300):
    try:
        urllib.request.urlopen(url, timeout=1).read()
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit(f"nats-server at {url} did not become healthy in 60 s")
PY
done
echo "export HERALD_TEST_NATS_URLS=$urls" >> "$state/env"
echo "$urls"
