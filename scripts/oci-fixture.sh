#!/usr/bin/env bash
# Builds the OCI test image (an OCI layout) the demo and the end-to-end tests
# push into a local registry: a Debian rootfs with busybox made by
# mmdebstrap, plus a second layer with a web root, served by busybox httpd
# on port 8080 as user `web`.
#
# Cached: the layout lands in $DATA_DIR/cache/oci-fixture/<key>/layout,
# <key> hashing this script and the versions of the packages it installs;
# an unchanged key reuses it. Prints the layout's path (tag `1`).
set -euo pipefail
DATA_DIR=${FORKVM_DATA_DIR:-/var/lib/forkvm}
PACKAGES=busybox-static,base-files,netbase
log() { echo "==> oci-fixture: $*" >&2; }

versions=$(apt-cache policy ${PACKAGES//,/ } | awk '/^[a-z]/{p=$1} /Candidate:/{print p, $2}')
key=$( { cat "$0"; echo "$versions"; } | sha256sum | cut -c1-16)
out=$DATA_DIR/cache/oci-fixture/$key
if [ -f "$out/done" ]; then
  echo "$out/layout"
  exit 0
fi
log "building the OCI test image ($key)"
# Layouts of older inputs are of no further use.
find "$DATA_DIR/cache/oci-fixture" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
rm -rf "$out" && mkdir -p "$out"
work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Layer 1: Debian's busybox (packages extracted, no maintainer scripts;
# the extract variant runs no customize hooks, so the rest is done here),
# its applets, and users root and web.
mmdebstrap --quiet --variant=extract --include="$PACKAGES" bookworm "$work/rootfs" >&2
chroot "$work/rootfs" /bin/busybox --install -s /bin
printf 'root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000:web:/srv:/bin/sh\n' > "$work/rootfs/etc/passwd"
printf 'root:x:0:\nweb:x:1000:\n' > "$work/rootfs/etc/group"
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
  --config.user web --config.workingdir /srv \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env GREETING=hello \
  --config.entrypoint httpd --config.cmd -f --config.cmd -p --config.cmd 8080 \
  --config.cmd -h --config.cmd /srv/www \
  --config.exposedports 8080/tcp \
  --architecture amd64 --os linux
umoci gc --layout "$layout"
mv "$layout" "$out/layout"
touch "$out/done"
log "built in $out/layout"
echo "$out/layout"
