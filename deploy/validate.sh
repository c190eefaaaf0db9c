#!/usr/bin/env bash
# deploy/validate.sh [--apiserver] [--write-bootstraps]
#
# Checks of deploy/ and deploy/files/ without a cluster:
#  - the four kustomizations render (`kubectl kustomize`; KUBECTL picks the kubectl, default
#    `kubectl`), deploy/proxy/'s central Deployment is deploy/'s with `--delivery=remote` only, and
#    deploy/tls/'s two Deployments are deploy/'s with the TLS settings and Secret volumes only;
#  - every namespaced object names its namespace (deploy/ sets no kustomize `namespace:`);
#  - the three Envoy bootstraps are what `wasm-ecds bootstrap --full` prints today (same commands
#    as in the comments of envoy-gateway.yaml, files/envoy-sidecar.yaml and tls/envoy-gateway.yaml;
#    --write-bootstraps rewrites the files instead), every ECDS filter they name is a plugin of
#    the same rendering (deploy/'s for deploy/tls/), and `envoy --mode validate` accepts them as
#    rendered into their ConfigMaps (the TLS one with certificates made by openssl where it looks
#    for its Secret's files);
#  - `wasm-ecds check` accepts every WasmPlugin: the objects, and the files of the files example.
# With --apiserver, also against a real etcd + kube-apiserver (scripts/kube/, 1.20):
#  - server-side dry-run, then a real apply, of everything rendered (the WasmPlugins after the CRD
#    is Established); Deployments get no pods: there is no scheduler or kubelet; of deploy/tls/,
#    a server-side dry run of all but the cert-manager objects (no cert-manager CRDs here);
#  - the admin token Secret created as deploy/README.md says, its token given to the replicas
#    below as the Deployment's volume would (/debug/plugins: 401 without it, 200 with it);
#  - the RBAC of rbac.yaml, as the wasm-ecds ServiceAccount's user (`kubectl auth can-i`);
#  - two `wasm-ecds serve --source kubernetes` replicas on this host with that user: one holds the
#    Lease and writes the demo plugin's status (first DownloadFailure: the module server's cluster
#    DNS name does not resolve here); with the URL patched to a module server on this host, Pulled;
#    after `kubectl label`, Revalidated, with a 304 for each replica (Always); the holder stops
#    and the other replica takes the Lease;
#  - a replica with the environment of deploy/tls/'s Deployment (its file paths moved to openssl
#    certificates): HTTPS probes answer, the module endpoint and /debug/* need a client
#    certificate from the CA (or the token), the xDS port refuses a client without one.
# It does NOT prove the manifests work on a cluster: no image is built and no pod runs.
# Needs: kubectl, python3 with PyYAML, openssl, Envoy (ENVOY_BIN or .tools/,
# scripts/install-test-deps.sh), cargo; for --apiserver, scripts/kube/install-kube.sh (cached) and curl. KEEP_OUT=1 keeps the
# work directory (renderings, serve logs); SERVE_LOG is the serve processes' RUST_LOG.
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."
APISERVER=0 WRITE=0
for a in "$@"; do
    case "$a" in
        --apiserver) APISERVER=1 ;;
        --write-bootstraps) WRITE=1 ;;
        *) echo "usage: deploy/validate.sh [--apiserver] [--write-bootstraps]" >&2; exit 2 ;;
    esac
done
KUBECTL="${KUBECTL:-kubectl}"
ENVOY="${ENVOY_BIN:-}"
if [[ -z "$ENVOY" && -x .tools/envoy/envoy/_bin/envoy ]]; then ENVOY="$PWD/.tools/envoy/envoy/_bin/envoy"; fi
if [[ -z "$ENVOY" ]]; then ENVOY="$(command -v envoy || true)"; fi
[[ -x "$ENVOY" ]] || { echo "error: no Envoy: set ENVOY_BIN (scripts/install-test-deps.sh)" >&2; exit 2; }
OUT="$(mktemp -d)"
PIDS=() STATE=""
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [[ -n "$STATE" ]]; then bash scripts/kube/start-kube.sh "$STATE" stop || true; fi
    if [[ "${KEEP_OUT:-0}" == 1 ]]; then echo "kept $OUT"; else rm -rf "$OUT"; fi
}
trap cleanup EXIT
step() { printf '== %s\n' "$*"; }

cargo build --quiet --bin wasm-ecds
WASM_ECDS="${CARGO_TARGET_DIR:-target}/debug/wasm-ecds"

step "bootstraps as printed by wasm-ecds bootstrap"
gen_gateway() {
    "$WASM_ECDS" bootstrap --full --plugins deploy/plugins.yaml \
        --namespace apps --labels app=envoy-gateway --node-id envoy-gateway \
        --xds-address wasm-ecds.wasm-ecds.svc.cluster.local:18000 \
        --delivery http --admin-address wasm-ecds.wasm-ecds.svc.cluster.local:15020 \
        --upstream backend.apps.svc.cluster.local:8080
}
gen_sidecar() {
    "$WASM_ECDS" bootstrap --full --plugins deploy/files/hello.yaml \
        --namespace wasm-ecds --labels app=envoy-sidecar --node-id envoy-sidecar --delta \
        --upstream backend.apps.svc.cluster.local:8080
}
gen_gateway_tls() {
    "$WASM_ECDS" bootstrap --full --plugins deploy/plugins.yaml \
        --namespace apps --labels app=envoy-gateway --node-id envoy-gateway \
        --xds-address wasm-ecds.wasm-ecds.svc.cluster.local:18000 \
        --delivery http --admin-address wasm-ecds.wasm-ecds.svc.cluster.local:15020 \
        --upstream backend.apps.svc.cluster.local:8080 \
        --tls-ca /etc/envoy-tls/ca.crt --tls-cert /etc/envoy-tls/tls.crt \
        --tls-key /etc/envoy-tls/tls.key
}
for pair in gateway:deploy/envoy-gateway.bootstrap.yaml sidecar:deploy/files/envoy-sidecar.bootstrap.yaml \
    gateway_tls:deploy/tls/envoy-gateway.bootstrap.yaml; do
    gen="gen_${pair%%:*}" file="${pair#*:}"
    if [[ "$WRITE" == 1 ]]; then "$gen" >"$file"; echo "wrote $file"; continue; fi
    "$gen" >"$OUT/generated.yaml"
    diff -u "$file" "$OUT/generated.yaml" || {
        echo "error: $file is not what wasm-ecds bootstrap prints now (deploy/validate.sh --write-bootstraps)" >&2
        exit 1
    }
    echo "$file: up to date"
done

step "render ($("$KUBECTL" version --client 2>/dev/null | head -1))"
"$KUBECTL" kustomize deploy/ >"$OUT/deploy.yaml"
"$KUBECTL" kustomize deploy/files/ >"$OUT/files.yaml"
"$KUBECTL" kustomize deploy/proxy/ >"$OUT/proxy.yaml"
"$KUBECTL" kustomize deploy/tls/ >"$OUT/tls.yaml"

# A CA, a server certificate for the Service's names and a client certificate, as cert-manager
# would put them in the Secrets wasm-ecds-tls and envoy-gateway-tls (tls.crt, tls.key, ca.crt).
mkcerts() {  # mkcerts DIR
    local d="$1"; mkdir -p "$d/server" "$d/client"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=wasm-ecds CA" \
        -addext basicConstraints=critical,CA:TRUE -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    for who in server client; do
        local ext="subjectAltName=DNS:wasm-ecds.wasm-ecds.svc,DNS:wasm-ecds.wasm-ecds.svc.cluster.local,DNS:localhost"
        [[ "$who" == client ]] && ext="subjectAltName=DNS:envoy-gateway.apps"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
            -keyout "$d/$who/tls.key" -out "$d/$who.csr" 2>/dev/null
        openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 1 \
            -extfile <(echo "$ext") -out "$d/$who/tls.crt" 2>/dev/null
        cp "$d/ca.crt" "$d/$who/ca.crt"
    done
}
mkcerts "$OUT/certs"
python3 - "$OUT" <<'PY'
import os, sys, yaml
out = sys.argv[1]
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterIssuer"}
PREFIX = "extensions.istio.io/wasmplugin/"
errors = []
os.makedirs(os.path.join(out, "plugins"))
os.makedirs(os.path.join(out, "envoy"))

def ecds_filters(node):
    """Names of the filters with config_discovery anywhere in a bootstrap."""
    if isinstance(node, dict):
        if "config_discovery" in node and "name" in node:
            yield node["name"]
        for v in node.values():
            yield from ecds_filters(v)
    elif isinstance(node, list):
        for v in node:
            yield from ecds_filters(v)

def deployment(rendering, name):
    for d in yaml.safe_load_all(open(os.path.join(out, rendering + ".yaml"))):
        if d and d["kind"] == "Deployment" and d["metadata"]["name"] == name:
            return d

# deploy/proxy/central.yaml is deploy/'s Deployment with --delivery=remote, nothing else.
central, base = deployment("proxy", "wasm-ecds"), deployment("deploy", "wasm-ecds")
args = central["spec"]["template"]["spec"]["containers"][0]["args"]
if "--delivery=remote" not in args:
    errors.append("proxy: Deployment wasm-ecds/wasm-ecds does not run --delivery=remote")
else:
    args[args.index("--delivery=remote")] = "--delivery=http"
    if central != base:
        errors.append("proxy: central.yaml's Deployment differs from deploy/wasm-ecds.yaml's in more than --delivery")
    else:
        print("proxy: Deployment wasm-ecds/wasm-ecds = deploy/'s with --delivery=remote")

# deploy/tls/'s Deployments are deploy/'s plus the TLS settings and the Secrets' volumes only.
def without_tls(d):
    spec = d["spec"]["template"]["spec"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "tls"]
    for c in spec["containers"]:
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "tls"]
        for probe in ("readinessProbe", "livenessProbe"):
            if c.get(probe, {}).get("httpGet", {}).pop("scheme", None) not in (None, "HTTPS"):
                errors.append(f"tls: {d['metadata']['name']}: {probe} not HTTPS")
        env = []
        for e in c.get("env", []):
            if e["name"] in ("WASM_ECDS_ADMIN_OPEN", "WASM_ECDS_MODULE_BASE_URL"):
                e = dict(e, value=None)
            if not any(t in e["name"] for t in ("_TLS_", "_CLIENT_CA")):
                env.append(e)
        if env:
            c["env"] = env
    return d
def unhashed(d):
    for v in d["spec"]["template"]["spec"]["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = v["configMap"]["name"].rsplit("-", 1)[0]
    return d
for name in ("wasm-ecds", "envoy-gateway"):
    tls, base = deployment("tls", name), deployment("deploy", name)
    if tls is None:
        errors.append(f"tls: no Deployment {name}")
        continue
    if name == "wasm-ecds":
        want = {"WASM_ECDS_XDS_TLS_CERT", "WASM_ECDS_XDS_CLIENT_CA", "WASM_ECDS_ADMIN_TLS_CERT", "WASM_ECDS_ADMIN_CLIENT_CA"}
        got = {e["name"] for e in tls["spec"]["template"]["spec"]["containers"][0]["env"]}
        if not want <= got:
            errors.append(f"tls: Deployment wasm-ecds lacks {sorted(want - got)}")
    if unhashed(without_tls(tls)) != unhashed(without_tls(base)):
        errors.append(f"tls: Deployment {name} differs from deploy/'s in more than its TLS settings")
    else:
        print(f"tls: Deployment {name} = deploy/'s with TLS settings and the Secret's volume")

served = {}
for rendering in ("deploy", "files", "proxy", "tls"):
    docs = [d for d in yaml.safe_load_all(open(os.path.join(out, rendering + ".yaml"))) if d]
    plugins, bootstraps = set(), {}
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        what = f"{rendering}: {kind} {meta.get('namespace', '-')}/{meta['name']}"
        if kind not in CLUSTER_SCOPED and not meta.get("namespace"):
            errors.append(f"{what}: no metadata.namespace")
        if kind == "WasmPlugin":
            plugins.add(f"{meta['namespace']}.{meta['name']}")
            path = os.path.join(out, "plugins", f"{meta['namespace']}.{meta['name']}.yaml")
            yaml.safe_dump(doc, open(path, "w"))
            print(f"{what}: WasmPlugin object")
        for key, text in (doc.get("data") or {}).items() if kind == "ConfigMap" else ():
            if key == "bootstrap.yaml":
                bootstraps[meta["name"]] = yaml.safe_load(text)
                open(os.path.join(out, "envoy", f"{rendering}-{meta['name']}.yaml"), "w").write(text)
                print(f"{what}: Envoy bootstrap")
                continue
            for p in yaml.safe_load_all(text):
                if isinstance(p, dict) and p.get("kind") == "WasmPlugin":
                    m = p["metadata"]
                    plugins.add(f"{m['namespace']}.{m['name']}")
                    open(os.path.join(out, "plugins", f"{rendering}-{meta['name']}-{key}"), "w").write(text)
                    print(f"{what}: plugin file {key}")
    served[rendering] = plugins
    if rendering == "tls":  # applied after deploy/: the plugins are deploy/'s
        plugins = plugins | served["deploy"]
    for name, bootstrap in bootstraps.items():
        for f in ecds_filters(bootstrap):
            if not f.startswith(PREFIX) or f[len(PREFIX):] not in plugins:
                errors.append(f"{rendering}: bootstrap {name}: filter {f} is no served plugin of {sorted(plugins)}")
            else:
                print(f"{rendering}: bootstrap {name}: filter {f} -> a plugin of this rendering")
for e in errors:
    print("error:", e, file=sys.stderr)
sys.exit(1 if errors else 0)
PY

step "envoy --mode validate ($("$ENVOY" --version | grep -o 'version: [^ ]*' | head -1))"
for f in "$OUT"/envoy/*.yaml; do
    # The TLS bootstrap reads the gateway's Secret at /etc/envoy-tls: here, the openssl files.
    sed -i "s#/etc/envoy-tls/#$OUT/certs/client/#g" "$f"
    "$ENVOY" --mode validate -c "$f" --disable-hot-restart -l error >/dev/null
    echo "$(basename "$f"): valid"
done

step "wasm-ecds check"
"$WASM_ECDS" check "$OUT"/plugins/
for f in "$OUT"/plugins/*; do echo "$(basename "$f"): valid"; done

if [[ "$APISERVER" == 1 ]]; then
    # shellcheck source=deploy/validate-apiserver.sh
    . deploy/validate-apiserver.sh
fi
echo "deploy/: all checks passed$([[ "$APISERVER" == 1 ]] && echo ", including the API server ones") (not run on a cluster)"
