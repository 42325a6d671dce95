#!/usr/bin/env bash
# Install what forkvm needs on a Debian 12 host (as root), build it, and build
# the default guest image. Idempotent and quick when everything is in place.
#   PROFILE=release|debug (default debug)   FORKVM_DATA_DIR (default /var/lib/forkvm)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
DATA_DIR=${FORKVM_DATA_DIR:-/var/lib/forkvm}
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root (it installs packages and creates network devices)" >&2; exit 1; }

# 1. Every external program forkvm, its scripts and its tests run, in one list:
#    "command  Debian-package  who runs it". A command that is missing gets its
#    package installed; `pkg:NAME` checks an installed package instead of a
#    command (busybox must be the static build: it goes into the guest).
TOOLS='
qemu-system-x86_64 qemu-system-x86 daemon: runs every VM
pkg:busybox-static busybox-static  guest image: the guest userland
ip                 iproute2        daemon (netns), tests, demo
nft                nftables        daemon: egress NAT, published ports, anti-spoofing filter
dnsmasq            dnsmasq-base    tests (guest_network): the upstream DNS server
ping               iputils-ping    tests, demo
curl               curl            tests, demo, bench: HTTP to guests
dpkg-deb           dpkg            image build: unpacks the kernel package
apt-get            apt             image build: downloads the kernel package
python3            python3         demo (JSON), tests (hypeman client venv)
unshare            util-linux      agent VM tests: private network namespace
strip              binutils        agent VM tests: strips the test agent
cpio               cpio            tests: cross-check of the initramfs writer
zstd               zstd            tests: zstd kernel payloads
mkfs.erofs         erofs-utils     daemon: OCI images into erofs root disks; tests (fsck.erofs)
qemu-img           qemu-utils      daemon, agent VM tests: qcow2 layers of writable disks
mkfs.ext4          e2fsprogs       daemon, agent VM tests: the empty ext4 under writable disks
docker-registry    docker-registry tests (crates/oci): a real registry on loopback
skopeo             skopeo          tests (crates/oci): pushes test images into it
htpasswd           apache2-utils   tests (crates/oci): basic-auth file for the registry
mmdebstrap         mmdebstrap      OCI test image (scripts/oci-fixture.sh): the Debian rootfs
umoci              umoci           OCI test image: layers and config of the layout
prometheus         prometheus      tests: a real Prometheus scrapes /metrics
c++                g++             fuzz targets (scripts/fuzz.sh): libFuzzer is C++
'
need=()
while read -r cmd pkg _; do
  [ -n "$cmd" ] || continue
  case "$cmd" in
    pkg:*) dpkg -s "${cmd#pkg:}" >/dev/null 2>&1 || need+=("$pkg") ;;
    *) command -v "$cmd" >/dev/null || need+=("$pkg") ;;
  esac
done <<<"$TOOLS"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# What apt cannot give: checked with a clear message.
command -v cargo >/dev/null || { echo "setup.sh: cargo not found: install Rust (rustup) first" >&2; exit 1; }
# apt-cache needs package lists to resolve the guest kernel package.
if ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
  log "refreshing apt package lists"
  apt-get update -qq
fi

# 2. Build: the host binaries, and the guest agent as a static binary.
flag=""; [ "$PROFILE" = release ] && flag="--release"
log "building forkvm ($PROFILE)"
cargo build $flag --workspace --bins --quiet
log "building the guest agent (static, release)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
  -p forkvm-agent --target x86_64-unknown-linux-gnu
AGENT=target/x86_64-unknown-linux-gnu/release/forkvm-agent

# 3. The default guest image (kernel from Debian's package, initramfs with the agent).
log "building the guest image in $DATA_DIR/images/default"
FORKVM_DATA_DIR="$DATA_DIR" "target/$PROFILE/forkvm" image build --agent "$AGENT"
