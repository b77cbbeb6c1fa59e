#!/usr/bin/env bash
# Stops what tests/node/up.sh started in STATE_DIR, in the order that leaves nothing
# running: the scheduler and the kubelet, then every container still running (containerd's
# shims outlive containerd), then containerd; then unmounts what remains mounted under
# STATE_DIR. Only its own processes, by PID. Run it before tests/controlplane/down.sh.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${1:?usage: down.sh STATE_DIR}
state=$(cd "$state" && pwd)
source "$here/../controlplane/lib.sh"
ctrd="$state/containerd"
[ -f "$ctrd/config.toml" ] || exit 0
stop kube-scheduler kubelet
ctr=(ctr --address "$ctrd/containerd.sock" --namespace k8s.io)
if [ -f "$state/containerd.pid" ]; then
  for task in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
    "${ctr[@]}" tasks kill --signal SIGKILL "$task" >/dev/null 2>&1
  done
  for _ in $(seq 1 50); do
    "${ctr[@]}" tasks ls 2>/dev/null | grep RUNNING >/dev/null || break
    sleep 0.1
  done
fi
stop containerd
# Shims are started by our containerd with its socket on their command line.
for proc in /proc/[0-9]*; do
  if tr '\0' ' ' < "$proc/cmdline" 2>/dev/null | grep -- "-address $ctrd/containerd.sock" >/dev/null; then
    kill -9 "${proc#/proc/}" 2>/dev/null
  fi
done
# Deepest first: pod volumes and sandbox mounts under the kubelet's and containerd's roots.
grep -F " $state/" /proc/mounts | awk '{print $2}' | sort -r | while read -r mount; do
  umount "$mount" 2>/dev/null || umount -l "$mount" 2>/dev/null
done
exit 0
