#!/usr/bin/env bash
# The whole test suite: checks formatting and lints (cargo fmt --check, cargo clippy
# -D warnings), builds the control plane tools (cached outside the clone) and the tests,
# builds herald's image here and installs the node's Debian packages (tests/node/prepare.sh)
# and Chromium for the console tests,
# then, in a network namespace of its own, starts etcd + kube-apiserver +
# kube-controller-manager on loopback, installs the CRD, adds a node (kubelet, containerd,
# kube-scheduler: tests/node/up.sh) and a 3-node NATS JetStream cluster (tests/nats/up.sh), runs every unit and integration test against it, and
# stops it all at the end. Needs root (the namespace, containerd).
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ -z "${HERALD_TEST_NETNS:-}" ]; then
  # Format and lint first: they are the cheapest failures.
  cargo fmt --check
  cargo clippy --locked --all-targets --all-features -- -D warnings

  bin=$(tests/controlplane/build-tools.sh)
  cargo build --locked --bins --tests --features cluster,nats
  images=$(mktemp -d "${HERALD_STATE_ROOT:-/dev/shm}/herald-images.XXXXXX")
  trap 'rm -rf "$images"' EXIT
  tests/node/prepare.sh "$images" target/debug/herald
  # The console tests' browser, and a CJK font for its screenshots.
  tests/debian-packages.sh chromium chromium-driver fonts-wqy-microhei

  # Everything that needs the network is done. The tests run where loopback is the only
  # device, so nothing they start (the node's pods included) reaches past this machine.
  HERALD_TEST_NETNS=1 HERALD_TOOLS_BIN=$bin HERALD_NODE_IMAGES=$images unshare --net "$0" "$@"
  exit
fi

ip link set lo up
# kubelet refuses a loopback node address; a second address on lo serves.
export HERALD_NODE_IP=10.244.0.1
ip addr add "$HERALD_NODE_IP/32" dev lo
export PATH="$HERALD_TOOLS_BIN:$PATH"

state=$(mktemp -d "${HERALD_STATE_ROOT:-/dev/shm}/herald-test.XXXXXX")
trap 'tests/nats/down.sh "$state"; tests/node/down.sh "$state"; tests/controlplane/down.sh "$state"; rm -rf "$state"' EXIT
tests/controlplane/up.sh "$state"
# The JetStream engine's tests run against a real 3-node cluster.
tests/nats/up.sh "$state" >/dev/null
source "$state/env"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd/eventsubscriptions.herald.dev crd/cmdbsources.herald.dev --timeout=60s >/dev/null
tests/node/up.sh "$state" "$HERALD_NODE_IMAGES"
source "$state/env"

# Both tiers: what plain `cargo test` runs anywhere, and what needs all of the above (the
# test binaries whose tests carry the `cluster` ignore, and the JetStream store's tests).
cluster_files=$(grep -l 'feature = "cluster"' tests/*.rs tests/faults/*.rs | sed 's|^tests/faults/.*|tests/faults/main.rs|' | sort -u | tr '\n' ' ')
cargo test --locked --features cluster,nats -- --list 2>&1 | awk -v files="$cluster_files" '
  BEGIN { n = split(files, f, " "); for (i = 1; i <= n; i++) gated[f[i]] = 1 }
  /^ *Running / { cluster = ($2 in gated) }
  /: test$/ { if (cluster || $0 ~ /^store::jetstream::tests::/) c++; else u++ }
  END { printf "test tiers: %d run anywhere (cargo test), %d need the cluster tier (turned on here: --features cluster,nats)\n", u, c }'
cargo test --locked --features cluster,nats "$@"
