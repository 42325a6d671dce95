#!/usr/bin/env bash
# The whole test suite: set-up (packages, build, guest image), then every test,
# including end-to-end tests that boot real VMs in network namespaces they create.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=debug ./scripts/setup.sh
# The official hypeman Python client (API compatibility test) and
# schemathesis (API fuzzing from the OpenAPI document), from PyPI.
export FORKVM_TEST_VENV=${FORKVM_TEST_VENV:-/var/lib/forkvm/test-venv}
SCHEMATHESIS_VERSION=4.32.5
if ! "$FORKVM_TEST_VENV/bin/python3" -c 'import hypeman' 2>/dev/null ||
   [ "$("$FORKVM_TEST_VENV/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
  echo "==> installing hypeman and schemathesis from PyPI into $FORKVM_TEST_VENV" >&2
  python3 -m venv "$FORKVM_TEST_VENV"
  "$FORKVM_TEST_VENV/bin/pip" install --quiet hypeman "schemathesis==$SCHEMATHESIS_VERSION"
fi
DATA_DIR=${FORKVM_DATA_DIR:-/var/lib/forkvm}
export FORKVM_TEST_IMAGES=$DATA_DIR/images
# The extracted guest kernel (vmlinux + modules) for tests that build their own initramfs.
FORKVM_TEST_KERNEL_DIR=$(ls -d "$DATA_DIR"/cache/kernel/*/extracted | tail -n 1)
export FORKVM_TEST_KERNEL_DIR FORKVM_TEST_KERNEL=$FORKVM_TEST_KERNEL_DIR/vmlinux
# The OCI test image (cached by its inputs) the image tests push into registries.
FORKVM_TEST_OCI_LAYOUT=$(FORKVM_DATA_DIR=$DATA_DIR ./scripts/oci-fixture.sh)
export FORKVM_TEST_OCI_LAYOUT
echo "==> cargo fmt --check / clippy" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> fuzz targets, ${FORKVM_FUZZ_SECONDS:=20}s each (libFuzzer on stable)" >&2
FORKVM_FUZZ_SECONDS=$FORKVM_FUZZ_SECONDS FORKVM_DATA_DIR=$DATA_DIR ./scripts/fuzz.sh
echo "==> tests" >&2
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-fail-fast --test-threads 2 --retries 0
else
  cargo test --workspace --no-fail-fast -- --test-threads 2
fi
echo "==> guest agent in a VM (static test build)" >&2
./crates/agent/scripts/vm-test.sh
