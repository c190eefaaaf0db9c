#!/usr/bin/env bash
# The project's test command (README, .ci/run): formatting, lints, then every test, including the
# real-registry and real-Envoy tests.
#
# Those find their tools through REGISTRY_BIN and ENVOY_BIN (see tests/support/mod.rs). Locally
# they skip with a loud message when a tool is missing; under CI=true they fail instead, so CI
# first installs them with scripts/install-test-deps.sh (apt needs root).
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${CI:-}" == "true" ]]; then
    bash scripts/install-test-deps.sh
fi
if [[ -z "${ENVOY_BIN:-}" && -x .tools/envoy/envoy/_bin/envoy ]]; then
    export ENVOY_BIN="$PWD/.tools/envoy/envoy/_bin/envoy"
fi

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "[test] cargo test"
cargo test
