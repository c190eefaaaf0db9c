#!/usr/bin/env bash
# Offline checks of deploy/ (no cluster needed): renders the kustomization, extracts the Envoy
# bootstraps and the WasmPlugins from their ConfigMaps, runs `envoy --mode validate` on each
# bootstrap and `wasm-ecds check` on the plugins. It does NOT prove the manifests work on a cluster.
# Needs: kubectl (for kustomize), python3 with PyYAML, Envoy (ENVOY_BIN or .tools/), cargo.
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ENVOY="${ENVOY_BIN:-}"
if [[ -z "$ENVOY" && -x .tools/envoy/envoy/_bin/envoy ]]; then ENVOY="$PWD/.tools/envoy/envoy/_bin/envoy"; fi
if [[ -z "$ENVOY" ]]; then ENVOY="$(command -v envoy || true)"; fi
[[ -x "$ENVOY" ]] || { echo "error: no Envoy: set ENVOY_BIN" >&2; exit 2; }
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

kubectl kustomize deploy/ >"$OUT/rendered.yaml"
python3 - "$OUT" <<'PY'
import os, sys, yaml
out = sys.argv[1]
for doc in yaml.safe_load_all(open(os.path.join(out, "rendered.yaml"))):
    if not doc or doc.get("kind") != "ConfigMap":
        continue
    name = doc["metadata"]["name"]
    for key, text in (doc.get("data") or {}).items():
        kind = "envoy" if key == "bootstrap.yaml" else "plugins"
        path = os.path.join(out, kind, f"{name}-{key}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write(text)
        print(f"extracted {kind}: {name}/{key}")
PY
for f in "$OUT"/envoy/*.yaml; do
    echo "envoy --mode validate $(basename "$f")"
    "$ENVOY" --mode validate -c "$f" --disable-hot-restart -l error
done
cargo run --quiet --bin wasm-ecds -- check "$OUT"/plugins/
echo "deploy/: rendered, bootstraps valid, plugins valid (not tested on a cluster)"
