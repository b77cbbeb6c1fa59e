#!/usr/bin/env bash
# Starts a local control plane (etcd on tmpfs, kube-apiserver, kube-controller-manager)
# on free loopback ports. Usage: up.sh STATE_DIR. Writes STATE_DIR/env (KUBECONFIG,
# HERALD_TEST_KUBECONFIG, HERALD_TOOLS_BIN, HERALD_CONTROLPLANE), STATE_DIR/kubeconfig,
# one STATE_DIR/<component>.pid per process and STATE_DIR/<component>.cmd, the command
# line that tests use to restart a component. Stop it with down.sh STATE_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${1:?usage: up.sh STATE_DIR}
mkdir -p "$state" && state=$(cd "$state" && pwd)
bin=${HERALD_TOOLS_BIN:-$("$here/build-tools.sh")}

source "$here/lib.sh"
etcd_client=$(free_port); etcd_peer=$(free_port); apiserver_port=$(free_port)

pki="$state/pki"; mkdir -p "$pki"
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=herald-test-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
openssl_quiet req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr"
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' > "$pki/apiserver.ext"
openssl_quiet x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 30 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

admin_token=$(openssl rand -hex 24); kcm_token=$(openssl rand -hex 24)
{
  echo "$admin_token,admin,admin,system:masters"
  echo "$kcm_token,system:kube-controller-manager,kcm,"
} > "$pki/tokens.csv"

server="https://127.0.0.1:$apiserver_port"
write_kubeconfig() { # FILE USER TOKEN
  cat > "$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: herald-test
  cluster:
    server: $server
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: herald-test
  context: {cluster: herald-test, user: $2, namespace: default}
current-context: herald-test
KUBECONFIG
}
write_kubeconfig "$state/kubeconfig" admin "$admin_token"
write_kubeconfig "$state/kcm.kubeconfig" system:kube-controller-manager "$kcm_token"

start etcd "$bin/etcd" --name herald-test --data-dir "$state/etcd-data" \
  --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "herald-test=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync \
  --listen-metrics-urls "" --log-level warn

start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_client" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
  --cert-dir "$pki" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" --api-audiences https://kubernetes.default.svc \
  --authorization-mode RBAC --service-cluster-ip-range 10.96.0.0/16 \
  --kubelet-preferred-address-types InternalIP --v 1

kubectl=("$bin/kubectl" --kubeconfig "$state/kubeconfig")
for _ in $(seq 1 120); do
  "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1 && break
  sleep 0.5
done
"${kubectl[@]}" get --raw /readyz >/dev/null || { echo "kube-apiserver did not become ready; see $state/kube-apiserver.log" >&2; exit 1; }

start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$state/kcm.kubeconfig" \
  --authentication-kubeconfig "$state/kcm.kubeconfig" --authorization-kubeconfig "$state/kcm.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials=true --controllers '*,-nodeipam,-cloud-node-lifecycle' --v 1

cat > "$state/env" <<ENV
export KUBECONFIG=$state/kubeconfig
export HERALD_TEST_KUBECONFIG=$state/kubeconfig
export HERALD_TOOLS_BIN=$bin
export HERALD_CONTROLPLANE=$state
ENV
echo "control plane up: $server (state in $state)" >&2
