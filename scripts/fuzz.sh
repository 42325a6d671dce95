#!/usr/bin/env bash
# Build the cargo-fuzz targets in fuzz/ and run each for a bounded time
# with libFuzzer, on the stable toolchain (docs/security.md, "Fuzzing").
#   scripts/fuzz.sh [TARGET...]     default: every target
#   FORKVM_FUZZ_SECONDS  seconds per target (default 20; 0 skips fuzzing)
#   FORKVM_DATA_DIR      cargo-fuzz, the build and the corpora are cached
#                        under its cache/ (default /var/lib/forkvm)
# A crash, a panic, a leak or a timeout fails the run (exit status != 0);
# libFuzzer leaves the input in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FORKVM_FUZZ_SECONDS:-20}
[ "$SECONDS_EACH" != 0 ] || { echo "fuzz.sh: FORKVM_FUZZ_SECONDS=0, skipped" >&2; exit 0; }
CACHE=${FORKVM_DATA_DIR:-/var/lib/forkvm}/cache
CARGO_FUZZ_VERSION=0.13.2
TOOL=$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# cargo-fuzz from crates.io, built once into the cache.
if [ "$("$TOOL/bin/cargo-fuzz" --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOL"
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$TOOL"
fi
export PATH=$TOOL/bin:$PATH
# libFuzzer's instrumentation needs unstable rustc flags: allowed on the
# stable compiler for this build only. No sanitizer (ASan needs a nightly
# std); coverage-guided all the same (sancov). Unoptimized with debug
# assertions and parallel codegen: the build, not the run, is what a
# bounded CI run pays for (cargo-fuzz's default, optimized with one codegen
# unit, takes several times longer to build forkvm-core and its tree).
export RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0
FLAGS=(--sanitizer none --dev --codegen-units 16)
# Dependencies' instrumented builds survive fresh clones in the cache.
TARGET_DIR=$CACHE/fuzz-target
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd fuzz && cargo fuzz list)

LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
start=$(date +%s)
log "building the fuzz targets (instrumented, $TARGET_DIR)"
if ! (cd fuzz && cargo fuzz build "${FLAGS[@]}" --target-dir "$TARGET_DIR") >"$LOGS/build" 2>&1; then
  cat "$LOGS/build" >&2
  exit 1
fi
log "built in $(( $(date +%s) - start ))s"
for t in "${targets[@]}"; do
  corpus=$CACHE/fuzz-corpus/$t
  mkdir -p "$corpus"
  log "fuzzing $t for ${SECONDS_EACH}s (corpus $corpus)"
  if ! (cd fuzz && cargo fuzz run "${FLAGS[@]}" --target-dir "$TARGET_DIR" "$t" "$corpus" -- \
      -max_total_time="$SECONDS_EACH" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1) >"$LOGS/$t" 2>&1; then
    tail -n 60 "$LOGS/$t" >&2
    echo "fuzz target $t failed: the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  # The coverage libFuzzer reached and how many inputs it ran.
  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|peak_rss_mb)' "$LOGS/$t" >&2 || true
done
log "fuzzing done in $(( $(date +%s) - start ))s"
