#!/usr/bin/env bash
# The checks before every commit: formatting and clippy on every target, warnings as errors.
#   bash scripts/lint.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
