#!/usr/bin/env bash
# The one command that runs every test on a fresh machine (README "The two commands", .ci/run):
#   bash scripts/test.sh
# It installs what the tests need (Debian's docker-registry and Envoy 1.40.0 from PyPI, via
# scripts/install-test-deps.sh: idempotent, apt needs root), checks formatting and lints, compiles
# the benches, replays the scenario library, and runs every Rust test suite (unit, property,
# real-registry, real-Envoy). Tests find the tools through REGISTRY_BIN and ENVOY_BIN; under
# CI=true a test that needs one fails instead of skipping.
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-test-deps.sh
export REGISTRY_BIN="${REGISTRY_BIN:-$(command -v docker-registry || echo /usr/bin/docker-registry)}"
export ENVOY_BIN="${ENVOY_BIN:-$PWD/.tools/envoy/envoy/_bin/envoy}"

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "[test] cargo build --benches (compile check; run them with cargo bench)"
cargo build --benches --locked
echo "[test] wasm-ecds sim scenarios/"
cargo run --locked --quiet -- sim scenarios/
echo "[test] cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --locked --no-fail-fast 2>&1 | tee "$log"
# One closing line over every suite (the scenario library is counted above).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
