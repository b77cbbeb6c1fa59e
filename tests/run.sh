#!/usr/bin/env bash
# The whole test suite: checks formatting and lints (cargo fmt --check, cargo clippy
# -D warnings), builds the control plane tools (cached outside the clone),
# starts etcd + kube-apiserver + kube-controller-manager on loopback, installs the CRD,
# runs every unit and integration test against it, and stops it at the end.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Format and lint first: they are the cheapest failures.
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

bin=$(tests/controlplane/build-tools.sh)
export HERALD_TOOLS_BIN=$bin PATH="$bin:$PATH"
cargo build --locked --bins --tests

state=$(mktemp -d "${HERALD_STATE_ROOT:-/dev/shm}/herald-test.XXXXXX")
trap 'tests/controlplane/down.sh "$state"; rm -rf "$state"' EXIT
tests/controlplane/up.sh "$state"
source "$state/env"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd/eventsubscriptions.herald.dev --timeout=60s >/dev/null

cargo test --locked "$@"
