#!/bin/sh
# Builds the agent (and the VM test) statically linked, then boots it as /init
# in QEMU and drives it over virtio-serial. Needs what scripts/setup.sh installs
# and FORKVM_TEST_KERNEL_DIR (the extracted kernel; scripts/test.sh sets it).
set -eu
cd "$(dirname "$0")/../../.."
export RUSTFLAGS="-C target-feature=+crt-static"
# --target keeps build scripts and proc-macros dynamic.
exec cargo test -p forkvm-agent --target x86_64-unknown-linux-gnu --test vm -- \
    --ignored --nocapture --test-threads=1 "$@"
