#!/usr/bin/env bash
# Builds herald's image here, from the repository's Dockerfile, without pulling anything:
# the runtime base comes from Debian packages (mmdebstrap: libc6 and libgcc-s1 only, and
# a passwd entry for the nonroot user 65532), the binary is one built on this machine
# (BINARY=prebuilt), and the pod sandbox image is tests/node/pause built static.
# Usage: image.sh OUT_DIR HERALD_BINARY [TAG]. Writes OUT_DIR/herald.oci.tar and
# OUT_DIR/pause.oci.tar (archives `ctr images import` loads), the image's name in
# OUT_DIR/tag, and prints the image size.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:?usage: image.sh OUT_DIR HERALD_BINARY [TAG]}
binary=${2:?usage: image.sh OUT_DIR HERALD_BINARY [TAG]}
tag=${3:-localhost/herald:node-test}
mkdir -p "$out" && out=$(cd "$out" && pwd)
"$root/tests/debian-packages.sh" buildah mmdebstrap binutils

# Storage of our own (vfs: no overlay mounts to clean up), not the machine's.
buildah=(buildah --root "$out/buildah/root" --runroot "$out/buildah/run" --storage-driver vfs)

runtime=localhost/herald-test/runtime:bookworm
mmdebstrap --quiet --variant=extract --include=libc6,libgcc-s1 \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" > "$1/etc/passwd"' \
  --customize-hook='printf "root:x:0:\nnonroot:x:65532:\n" > "$1/etc/group"' \
  --customize-hook='rm -rf "$1/var/lib/apt" "$1/var/cache/apt" "$1/etc/apt" "$1/var/lib/dpkg" "$1/etc/dpkg"' \
  bookworm "$out/runtime.tar"
container=$("${buildah[@]}" from scratch)
"${buildah[@]}" add --quiet "$container" "$out/runtime.tar" / >/dev/null
"${buildah[@]}" commit --quiet --rm "$container" "$runtime" >/dev/null

# The pod sandbox: a static Go program that waits for its stop signal.
pause=localhost/herald-test/pause:latest
(cd "$here/pause" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$out/pause" .)
container=$("${buildah[@]}" from scratch)
"${buildah[@]}" copy --quiet "$container" "$out/pause" /pause >/dev/null
"${buildah[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$container"
"${buildah[@]}" commit --quiet --rm "$container" "$pause" >/dev/null

# herald: the Dockerfile with both bases local, the binary without its debug sections.
context="$out/context"
rm -rf "$context" && mkdir -p "$context"
objcopy --strip-debug "$binary" "$context/herald"
"${buildah[@]}" bud --quiet --pull-never --layers=false -f "$root/Dockerfile" \
  --build-arg BINARY=prebuilt --build-arg RUNTIME_IMAGE="$runtime" -t "$tag" "$context" >/dev/null

rm -f "$out/herald.oci.tar" "$out/pause.oci.tar"
"${buildah[@]}" push --quiet "$tag" "oci-archive:$out/herald.oci.tar:$tag"
"${buildah[@]}" push --quiet "$pause" "oci-archive:$out/pause.oci.tar:$pause"
echo "$tag" > "$out/tag"
echo "image $tag: $("${buildah[@]}" images --format '{{.Size}}' "$tag") ($(stat -c %s "$context/herald") bytes of binary)"
