#!/usr/bin/env bash
# Builds the OCI test image (an OCI layout) the demo and the end-to-end tests
# push into a local registry: a Debian root with python3 made by mmdebstrap
# from the package mirror, plus a second layer with a web root that
# `python3 -m http.server 8080` serves as user `web`.
#
# Cached: the layout lands in $DATA_DIR/cache/oci-fixture/<key>/layout,
# <key> hashing this script and the versions of the packages it installs;
# an unchanged key reuses it. Prints the layout's path (tag `1`).
set -euo pipefail
DATA_DIR=${FORKVM_DATA_DIR:-/var/lib/forkvm}
PACKAGES=python3
log() { echo "==> oci-fixture: $*" >&2; }

versions=$(apt-cache policy ${PACKAGES//,/ } | awk '/^[a-z]/{p=$1} /Candidate:/{print p, $2}')
key=$( { cat "$0"; echo "$versions"; } | sha256sum | cut -c1-16)
out=$DATA_DIR/cache/oci-fixture/$key
if [ -f "$out/done" ]; then
  echo "$out/layout"
  exit 0
fi
log "building the OCI test image ($key)"
rm -rf "$out" && mkdir -p "$out"
# Layouts of older inputs are of no further use.
find "$DATA_DIR/cache/oci-fixture" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Layer 1: Debian's essential set and python3 (docs, man pages and
# locales left out), and a user `web`.
mmdebstrap --quiet --variant=essential --include="$PACKAGES" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  bookworm "$work/rootfs" >&2
echo 'web:x:1000:1000:web:/srv:/bin/sh' >> "$work/rootfs/etc/passwd"
echo 'web:x:1000:' >> "$work/rootfs/etc/group"
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:1"
umoci unpack --image "$layout:1" "$work/bundle" >/dev/null
cp -a "$work/rootfs/." "$work/bundle/rootfs/"
umoci repack --image "$layout:1" "$work/bundle"
rm -rf "$work/bundle"

# Layer 2: the web root (owned by `web`) and a scratch directory.
umoci unpack --image "$layout:1" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/srv/www" "$work/bundle/rootfs/srv/data"
echo "forkvm oci fixture" > "$work/bundle/rootfs/srv/www/index.html"
chown -R 1000:1000 "$work/bundle/rootfs/srv"
umoci repack --image "$layout:1" "$work/bundle"
rm -rf "$work/bundle"

umoci config --image "$layout:1" \
  --config.user web --config.workingdir /srv/www \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env GREETING=hello \
  --config.entrypoint python3 --config.entrypoint -m --config.entrypoint http.server \
  --config.cmd 8080 \
  --config.exposedports 8080/tcp \
  --architecture amd64 --os linux
umoci gc --layout "$layout"
mv "$layout" "$out/layout"
touch "$out/done"
log "built in $out/layout"
echo "$out/layout"
