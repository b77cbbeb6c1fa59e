#!/usr/bin/env bash
# Adds a node to the control plane that tests/controlplane/up.sh started in STATE_DIR:
# containerd (Debian's, with runc) and a kubelet registered with the local kube-apiserver,
# kube-scheduler, herald's image built here and loaded into containerd, and a local
# PersistentVolume for the chart's claim. Usage: up.sh STATE_DIR IMAGES_DIR, with
# IMAGES_DIR from tests/node/prepare.sh and $HERALD_NODE_IP an address on this network
# namespace's loopback device (tests/run.sh makes both). Needs root. Appends HERALD_NODE_*
# to STATE_DIR/env; stop it with tests/node/down.sh before tests/controlplane/down.sh.
#
# What this machine needs (docs/install.md, "A node on this machine"):
# - cgroup v1: kubelet 1.35 runs on it only with failCgroupV1: false; cgroupfs driver.
# - root here lacks CAP_SYS_RESOURCE, so runc cannot lower a sandbox's oom_score_adj:
#   containerd's restrict_oom_score_adj.
# - no pod network: pods use the host network, which is a network namespace of the test
#   run's own with loopback as its only device; kubelet refuses a loopback node IP, so
#   the node's address is a second address on that device. The CNI configuration is
#   loopback alone, which is what makes the runtime report its network ready.
# - no registry: images come from archives, and the node is tainted so that only pods
#   that tolerate it (the node test's release) are scheduled onto it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
state=${1:?usage: up.sh STATE_DIR IMAGES_DIR}
images=${2:?usage: up.sh STATE_DIR IMAGES_DIR}
node_ip=${HERALD_NODE_IP:?set HERALD_NODE_IP to an address on the loopback device of this network namespace}
state=$(cd "$state" && pwd)
source "$root/tests/controlplane/lib.sh"
source "$state/env"
bin=$HERALD_TOOLS_BIN
for command in containerd runc ctr; do
  command -v "$command" >/dev/null || { echo "$command is missing: run tests/node/prepare.sh first" >&2; exit 1; }
done
# Pods share this network namespace: it must be one with loopback alone, so that nothing
# they do reaches past this machine.
devices=$(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort -u | tr '\n' ' ')
[ "$devices" = "lo " ] || { echo "the node runs only in a network namespace with loopback alone (found: $devices)" >&2; exit 1; }
ip -o addr show dev lo | grep " $node_ip/" >/dev/null || { echo "$node_ip is not an address of lo" >&2; exit 1; }

node=herald-node-$(basename "$state" | tr -c 'a-zA-Z0-9\n' '-' | tr 'A-Z' 'a-z')
image=$(cat "$images/tag")
storage_class=herald-node-local
taint=herald.dev/node-test
kubectl=("$bin/kubectl" --kubeconfig "$state/kubeconfig")

# containerd with a root, state and sockets of its own.
ctrd="$state/containerd"
mkdir -p "$ctrd" "$state/cni/conf"
cat > "$state/cni/conf/10-loopback.conflist" <<CNI
{"cniVersion": "1.0.0", "name": "herald-node-loopback", "plugins": [{"type": "loopback"}]}
CNI
cat > "$ctrd/config.toml" <<TOML
version = 2
root = "$ctrd/root"
state = "$ctrd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "$ctrd/containerd.sock"
[ttrpc]
  address = "$ctrd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctrd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/herald-test/pause:latest"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni/conf"
TOML
start containerd containerd --config "$ctrd/config.toml"
ctr=(ctr --address "$ctrd/containerd.sock" --namespace k8s.io)
for _ in $(seq 1 100); do "${ctr[@]}" version >/dev/null 2>&1 && break; sleep 0.2; done
"${ctr[@]}" version >/dev/null || { echo "containerd did not start; see $state/containerd.log" >&2; exit 1; }
for archive in pause herald; do
  "${ctr[@]}" images import --snapshotter native "$images/$archive.oci.tar" >&2
done

# The kubelet: serving on the node's address in this namespace only, open to anonymous
# requests (the API server's logs and port-forward), registered with the admin identity
# of this test cluster.
kubelet_port=$(free_port); healthz_port=$(free_port)
mkdir -p "$state/kubelet" "$state/pod-logs"
cat > "$state/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
localStorageCapacityIsolation: false
containerRuntimeEndpoint: unix://$ctrd/containerd.sock
address: $node_ip
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
podLogsDir: $state/pod-logs
resolvConf: /etc/resolv.conf
registerWithTaints:
- {key: $taint, value: "true", effect: NoSchedule}
YAML
start kubelet "$bin/kubelet" --config "$state/kubelet.yaml" --kubeconfig "$state/kubeconfig" \
  --root-dir "$state/kubelet" --cert-dir "$state/kubelet/pki" \
  --hostname-override "$node" --node-ip "$node_ip" --v 1
start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$state/kubeconfig" \
  --authentication-kubeconfig "$state/kubeconfig" --authorization-kubeconfig "$state/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false --v 1

for _ in $(seq 1 120); do "${kubectl[@]}" get node "$node" >/dev/null 2>&1 && break; sleep 0.5; done
"${kubectl[@]}" wait --for condition=Ready "node/$node" --timeout 60s >&2 \
  || { echo "node $node not Ready; see $state/kubelet.log and $state/containerd.log" >&2; exit 1; }

# A local volume on this node for the chart's claim (root-owned, 0755: the chart's
# fsGroup is what must make it writable for herald's user), in a class that binds when
# the scheduler places the pod, as local volumes do.
volume="$state/node-volume"
mkdir -p "$volume" && chmod 0755 "$volume"
"${kubectl[@]}" apply -f - >&2 <<PV
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: $storage_class}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: $node-data}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: $storage_class
  local: {path: $volume}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {key: kubernetes.io/hostname, operator: In, values: [$node]}
PV

server=$(sed -n 's/^ *server: https:\/\/\(.*\)$/\1/p' "$state/kubeconfig" | head -1)
cat >> "$state/env" <<ENV
export HERALD_NODE_NAME=$node
export HERALD_NODE_IP=$node_ip
export HERALD_NODE_TAINT=$taint
export HERALD_NODE_IMAGE=$image
export HERALD_NODE_STORAGE_CLASS=$storage_class
export HERALD_NODE_VOLUME=$volume
export HERALD_NODE_APISERVER=$server
export HERALD_NODE_CONTAINERD=$ctrd/containerd.sock
ENV
echo "node $node Ready (kubelet $node_ip:$kubelet_port, containerd $ctrd/containerd.sock)" >&2
