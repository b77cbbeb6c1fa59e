#!/usr/bin/env bash
# Builds the test/dev control plane (kube-apiserver, kube-controller-manager,
# kubectl, etcd, helm, for tests/node kubelet and kube-scheduler, and nats-server for the
# JetStream store) from Go modules, as docs/design.md §8 prescribes, and caches the
# binaries outside the clone, keyed by version. Prints the bin directory.
# A cold build takes 20-35 minutes on 2 cores; a warm one is instant.
set -euo pipefail
tools=$(cd "$(dirname "$0")/../tools" && pwd)
source "$tools/versions.env"
cache=${HERALD_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/herald-tools}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

# build_tool NAME-VERSION DIR LDFLAGS PACKAGES...: go build into $cache/NAME-VERSION,
# through a temporary directory so an interrupted build never looks finished.
build_tool() {
  local key=$1 dir=$2 ldflags=$3; shift 3
  local out="$cache/$key"
  [ -f "$out/.complete" ] && return 0
  echo "building $key (cached afterwards in $out)" >&2
  local tmp="$out.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/" "$@") >&2
  touch "$tmp/.complete"
  rm -rf "$out" && mv "$tmp" "$out"
}

kminor=${KUBERNETES_VERSION#v1.}; kminor=${kminor%%.*}
kver_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kver_flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$kminor"
  kver_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

helm_k8s=$(sed -n 's/^\s*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$tools/helm/go.mod" | head -1)
helm_flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_k8s"
done

build_tool "etcd-$ETCD_VERSION" "$tools/etcd" "" .
build_tool "kubernetes-$KUBERNETES_VERSION" "$tools/kubernetes" "$kver_flags" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
# The node (kubelet, kube-scheduler) only serves tests/node; cached apart so adding it does
# not rebuild the control plane.
build_tool "kubernetes-node-$KUBERNETES_VERSION" "$tools/kubernetes" "$kver_flags" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler
build_tool "helm-$HELM_VERSION" "$tools/helm" "$helm_flags" helm.sh/helm/v3/cmd/helm
# nats-server reports its VERSION constant; the ldflag names the release it was built from
# (a module build has no VCS revision to show).
build_tool "nats-server-$NATS_SERVER_VERSION" "$tools/nats" \
  "-X github.com/nats-io/nats-server/v2/server.gitCommit=$NATS_SERVER_VERSION" github.com/nats-io/nats-server/v2

bin="$cache/bin-$KUBERNETES_VERSION-$ETCD_VERSION-$HELM_VERSION"
mkdir -p "$bin"
ln -sf "$cache/etcd-$ETCD_VERSION/etcd" "$bin/etcd"
for t in kube-apiserver kube-controller-manager kubectl; do ln -sf "$cache/kubernetes-$KUBERNETES_VERSION/$t" "$bin/$t"; done
for t in kubelet kube-scheduler; do ln -sf "$cache/kubernetes-node-$KUBERNETES_VERSION/$t" "$bin/$t"; done
ln -sf "$cache/helm-$HELM_VERSION/helm" "$bin/helm"
ln -sf "$cache/nats-server-$NATS_SERVER_VERSION/nats-server" "$bin/nats-server"
echo "$bin"
