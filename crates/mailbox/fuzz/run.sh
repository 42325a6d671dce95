#!/bin/sh
# Fuzz forkvm-mailbox with cargo-fuzz (libFuzzer). Needs a nightly toolchain:
#   rustup toolchain install nightly && cargo +nightly install cargo-fuzz
# Usage: crates/mailbox/fuzz/run.sh [target] [seconds]
#   targets: decode (default), ack_verify
# Without nightly, run the bounded stable stand-in instead:
#   FVM_FUZZ_CASES=200000 cargo test -p forkvm-mailbox --test properties never_panic
set -eu
target="${1:-decode}"
secs="${2:-60}"
cd "$(dirname "$0")/.."
exec cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -max_len=4200
