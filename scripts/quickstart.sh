#!/usr/bin/env bash
# herald end to end on this machine: builds what it needs (the control plane tools are
# cached outside the clone), starts a local control plane, installs the CRDs, runs
# `herald run`, applies an example subscription, publishes an event and shows the
# callback receiving it; then points a CmdbSource at the bk-cmdb watch emulator of the
# tests (a stand-in for bk-cmdb), makes a host change there and shows it arriving too. Keeps running until Ctrl-C (HERALD_QUICKSTART_EXIT=1: stop
# after the demo). Everything listens on 127.0.0.1 only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bin=$(tests/controlplane/build-tools.sh)
export PATH="$bin:$PATH"
cargo build --locked --bin herald

state=$(mktemp -d "${TMPDIR:-/tmp}/herald-quickstart.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  tests/controlplane/down.sh "$state/cp"
  echo "stopped; state was in $state"
}
trap cleanup EXIT

tests/controlplane/up.sh "$state/cp"
source "$state/cp/env"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd/eventsubscriptions.herald.dev crd/cmdbsources.herald.dev --timeout=60s >/dev/null
kubectl create namespace herald-system >/dev/null

# A callback receiver on 127.0.0.1:18081 that prints what it gets (examples/ point there).
cat > "$state/receiver.py" <<'PY'
import http.server, json, sys
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        print(f"receiver: {self.path} webhook-id={self.headers.get('webhook-id')} {body.decode()}", flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(b'{"result": true}')
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 18081), Receiver).serve_forever()
PY
python3 "$state/receiver.py" > "$state/receiver.log" 2>&1 &
pids+=($!)

# A stand-in for bk-cmdb: the resource watch emulator the tests use, on 127.0.0.1:18082.
python3 tests/cmdb_emulator/emulator.py --port 18082 --port-file "$state/cmdb.port" > "$state/cmdb.log" 2>&1 &
pids+=($!)

# Development settings: anonymous API (never in production), loopback callbacks and sources allowed.
cat > "$state/config.yaml" <<YAML
store:
  path: $state/store
callbackGuard:
  allowCidrs: ["127.0.0.0/8"]
sources:
  ownNamespaceAllowCidrs: ["127.0.0.0/8"]
api:
  auth:
    anonymous: true
YAML
RUST_LOG=info,kube=warn target/debug/herald run --config "$state/config.yaml" --namespace herald-system \
  --listen 127.0.0.1:18080 > "$state/herald.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.2; done
curl -sf http://127.0.0.1:18080/readyz >/dev/null || { cat "$state/herald.log"; exit 1; }

kubectl apply -n herald-system -f examples/
kubectl wait -n herald-system --for=condition=Ready esub --all --timeout=60s
kubectl get esub -n herald-system

echo; echo "publishing a hostcreate event:"
curl -s -X POST http://127.0.0.1:18080/api/v3/event/publish -H 'Content-Type: application/json' \
  -d '{"event_type":"instdata","action":"create","obj_type":"host","bk_supplier_account":"0","data":[{"cur_data":{"bk_host_id":1,"bk_host_innerip":"10.0.0.1"}}]}'
echo
for _ in $(seq 1 50); do grep -q "receiver:" "$state/receiver.log" && break; sleep 0.2; done
cat "$state/receiver.log"
for _ in $(seq 1 50); do
  [ "$(kubectl get esub host-changes -n herald-system -o jsonpath='{.status.statistics.total}')" = "1" ] && break; sleep 0.2
done
kubectl get esub -n herald-system

echo; echo "reading bk-cmdb's resource watch (the emulator) with a CmdbSource:"
kubectl apply -f - <<YAML
apiVersion: herald.dev/v1alpha1
kind: CmdbSource
metadata: {name: cmdb, namespace: herald-system}
spec:
  url: http://127.0.0.1:18082
  api: direct
  supplierAccount: "0"
  resources: [{resource: host, fields: [bk_host_id, bk_host_innerip]}]
YAML
kubectl wait -n herald-system --for=condition=Ready csrc/cmdb --timeout=60s
echo "a host created in bk-cmdb:"
curl -s -X POST http://127.0.0.1:18082/emulator/events -H 'Content-Type: application/json' \
  -d '{"resource":"host","events":[{"type":"create","detail":{"bk_host_id":2,"bk_host_innerip":"10.0.0.2","bk_supplier_account":"0"}}]}'
echo
for _ in $(seq 1 50); do [ "$(grep -c "receiver:" "$state/receiver.log")" -ge 2 ] && break; sleep 0.2; done
tail -n 1 "$state/receiver.log"
kubectl get csrc -n herald-system

cat <<TXT

herald is running: REST API on http://127.0.0.1:18080, log in $state/herald.log.
Console: http://127.0.0.1:18080/console/ (sign in with the token field empty: this
development setup allows anonymous access).
Use kubectl against the local control plane:
  export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH
  kubectl get esub -A
  kubectl describe esub host-changes -n herald-system
  kubectl get csrc cmdb -n herald-system -o yaml
Make more bk-cmdb changes: POST http://127.0.0.1:18082/emulator/events (tests/cmdb_emulator/README.md).
TXT
[ "${HERALD_QUICKSTART_EXIT:-0}" = 1 ] && exit 0
echo "Ctrl-C stops herald and the control plane."
wait
