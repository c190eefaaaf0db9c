#!/usr/bin/env bash
# End-to-end demo of wasm-ecds with a real Envoy (examples/envoy/README.md):
#   1. builds wasm-ecds, and assembles module.wat into a Wasm module with the tiny standalone
#      package wat2wasm/ (only the `wat` crate: not wasm-ecds' dev-dependencies);
#   2. serves the module over HTTP (python3 -m http.server on 127.0.0.1:18080);
#   3. starts `wasm-ecds serve --plugins <copy of plugins/>` (xDS 127.0.0.1:18000, admin :15020)
#      and Envoy with bootstrap.yaml (listener 127.0.0.1:10000, admin :9901);
#   4. curls the listener and shows the header the module adds (its configuration);
#   5. edits pluginConfig in the plugin file and curls again: Envoy serves the new configuration
#      without a restart, from the cached module.
# Everything runs in a temporary directory and is stopped on exit. Every phase is announced with
# the seconds elapsed; cargo shows its progress (the first build on a fresh clone takes minutes).
# Needs: cargo, python3, curl, Envoy (ENVOY_BIN, else .tools/envoy/envoy/_bin/envoy from
# scripts/install-test-deps.sh, else `envoy` on PATH).
set -euo pipefail
exec </dev/null
EX="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$EX/../.." && pwd)"
cd "$ROOT"

ENVOY="${ENVOY_BIN:-}"
if [[ -z "$ENVOY" && -x .tools/envoy/envoy/_bin/envoy ]]; then ENVOY="$ROOT/.tools/envoy/envoy/_bin/envoy"; fi
if [[ -z "$ENVOY" ]]; then ENVOY="$(command -v envoy || true)"; fi
[[ -x "$ENVOY" ]] || { echo "error: no Envoy: set ENVOY_BIN or run scripts/install-test-deps.sh" >&2; exit 2; }
for tool in python3 curl; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 2; }
done
for port in 18000 15020 18080 9901 10000; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "error: 127.0.0.1:$port is already in use (this example uses fixed ports)" >&2
        exit 2
    fi
done

WORK="$(mktemp -d -t wasm-ecds-example.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
# Bold headings on a terminal only: no escapes in logs and pipes.
if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
step() { printf '\n%s== [%3ds] %s%s\n' "$BOLD" "$SECONDS" "$*" "$PLAIN"; }

# Polls `curl` on the listener until the config header equals $1 (at most 30 s).
wait_header() {
    local want="$1" got=""
    for _ in $(seq 300); do
        got="$(curl -s -o /dev/null -D - http://127.0.0.1:10000/ 2>/dev/null \
            | tr -d '\r' | sed -n 's/^x-wasm-plugin-config: //Ip' || true)"
        [[ "$got" == "$want" ]] && return 0
        sleep 0.1
    done
    echo "error: x-wasm-plugin-config is '$got', wanted '$want' after 30s" >&2
    echo "--- wasm-ecds log ---" >&2; tail -20 "$WORK/wasm-ecds.log" >&2
    echo "--- envoy log ---" >&2; tail -20 "$WORK/envoy.log" >&2
    return 1
}

step "build wasm-ecds (cargo build --bin wasm-ecds; minutes on a fresh clone, seconds after)"
cargo build --bin wasm-ecds
mkdir -p "$WORK/www" "$WORK/plugins" "$WORK/cache"
step "assemble module.wat (examples/envoy/wat2wasm: builds only the wat crate, once)"
cargo run --manifest-path "$EX/wat2wasm/Cargo.toml" --target-dir "$ROOT/target/wat2wasm" \
    -- "$EX/module.wat" "$WORK/www/module.wasm"
cp "$EX"/plugins/*.yaml "$WORK/plugins/"

step "serve the module: http://127.0.0.1:18080/module.wasm"
python3 -m http.server 18080 --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/http.log" 2>&1 &
PIDS+=($!)

step "start wasm-ecds serve --plugins $WORK/plugins"
RUST_LOG="${RUST_LOG:-info}" "$ROOT/target/debug/wasm-ecds" serve \
    --plugins "$WORK/plugins" --cache-dir "$WORK/cache" \
    --xds-address 127.0.0.1:18000 --admin-address 127.0.0.1:15020 >"$WORK/wasm-ecds.log" 2>&1 &
PIDS+=($!)

step "start Envoy with examples/envoy/bootstrap.yaml"
"$ENVOY" -c "$EX/bootstrap.yaml" --disable-hot-restart --concurrency 1 \
    -l warning --component-log-level wasm:info,config:info >"$WORK/envoy.log" 2>&1 &
PIDS+=($!)

step "wait until Envoy has the filter from wasm-ecds (it pulls the module from :18080)"
wait_header '{"greeting":"hello"}'
step "curl -si http://127.0.0.1:10000/"
curl -si http://127.0.0.1:10000/

step "edit pluginConfig (greeting: hello -> bonjour) in $WORK/plugins/hello.yaml"
start=$(date +%s%N)
sed -i 's/greeting: hello/greeting: bonjour/' "$WORK/plugins/hello.yaml"
wait_header '{"greeting":"bonjour"}'
end=$(date +%s%N)
echo "Envoy serves the new configuration $(( (end - start) / 1000000 )) ms after the edit"
step "curl -si http://127.0.0.1:10000/"
curl -si http://127.0.0.1:10000/

step "what happened (total ${SECONDS}s)"
echo "module downloads from the HTTP server (1 expected: the edit used the cache):"
grep -c 'GET /module.wasm' "$WORK/http.log" || true
echo "wasm-ecds /debug/plugins:"
curl -s http://127.0.0.1:15020/debug/plugins
echo
echo "Envoy ECDS stats:"
curl -s 'http://127.0.0.1:9901/stats?filter=extension_config_discovery.*(version_text|update_success|update_rejected)'
echo "wasm-ecds xDS metrics:"
curl -s http://127.0.0.1:15020/metrics | grep -E '^(wasm_ecds_xds|istio_agent_wasm_remote_fetch_count)'
