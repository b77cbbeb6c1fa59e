#!/usr/bin/env bash
# Everything the node needs from the network, done before tests/run.sh moves into its
# network namespace: the Debian packages (containerd, runc, the CNI loopback plugin) and
# herald's image with its local bases (tests/node/image.sh). Usage: prepare.sh IMAGES_DIR
# HERALD_BINARY; tests/node/up.sh then loads IMAGES_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
images=${1:?usage: prepare.sh IMAGES_DIR HERALD_BINARY}
binary=${2:?usage: prepare.sh IMAGES_DIR HERALD_BINARY}
"$here/../debian-packages.sh" containerd runc containernetworking-plugins
"$here/image.sh" "$images" "$binary"
