#!/bin/sh
# Builds the agent (and the VM test) statically linked, then boots it as /init
# in QEMU and drives it over virtio-serial. Needs root, qemu, busybox-static,
# cpio and the kernel at /var/tmp/kdev.
set -eu
cd "$(dirname "$0")/../../.."
export RUSTFLAGS="-C target-feature=+crt-static"
# --target keeps build scripts and proc-macros dynamic.
exec cargo test -p forkvm-agent --target x86_64-unknown-linux-gnu --test vm -- \
    --ignored --nocapture --test-threads=1 "$@"
