#!/usr/bin/env bash
# The benchmark of issue 6 (BENCHMARKS.md): builds the control plane tools (cached outside
# the clone), starts etcd + kube-apiserver + kube-controller-manager on loopback in a
# temporary state directory under /dev/shm, installs the CRD, builds herald in release
# mode, runs `cargo bench --bench bench` (which starts herald and the callback receiver as
# separate processes) and stops the control plane at the end, also on failure. A 3-node
# NATS JetStream cluster (tests/nats/up.sh) runs beside it for the JetStream runs.
#
# Sizes scale down with environment variables, for example a quick run:
#   HERALD_BENCH_RAW_SECONDS=1 HERALD_BENCH_ORDERED_EVENTS=2000 HERALD_BENCH_FANOUT=100 \
#   HERALD_BENCH_FANOUT_DELIVERIES=5000 HERALD_BENCH_LATENCY_SECONDS=3 \
#   HERALD_BENCH_REST_CREATES=50 HERALD_BENCH_SCALE=1000 benches/run.sh
# HERALD_BENCH_PHASES=raw,delivery,scale,sources,engines picks phases; the table goes to stdout,
# progress to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bin=$(tests/controlplane/build-tools.sh)
export HERALD_TOOLS_BIN=$bin PATH="$bin:$PATH"
cargo build --release --locked --bins
cargo bench --locked --bench bench --no-run

state=$(mktemp -d "${HERALD_STATE_ROOT:-/dev/shm}/herald-bench.XXXXXX")
trap 'tests/nats/down.sh "$state"; tests/controlplane/down.sh "$state"; rm -rf "$state"' EXIT
tests/controlplane/up.sh "$state"
# The JetStream runs (engines phase, scale on JetStream) use a 3-node cluster beside it.
tests/nats/up.sh "$state" >/dev/null
source "$state/env"
export HERALD_BENCH_NATS_URLS=$HERALD_TEST_NATS_URLS
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd/eventsubscriptions.herald.dev crd/cmdbsources.herald.dev --timeout=60s >/dev/null

export HERALD_BENCH_KUBECONFIG=$KUBECONFIG
cargo bench --locked --bench bench
