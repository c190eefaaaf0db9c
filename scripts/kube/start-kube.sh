#!/usr/bin/env bash
# start-kube.sh STATE_DIR [start|stop|stop-apiserver|start-apiserver]
# start: starts etcd + kube-apiserver on 127.0.0.1 (free ports chosen automatically), waits for
#   /readyz, writes STATE_DIR/kubeconfig (CA + admin client cert embedded, plus a token user),
#   STATE_DIR/wasm-ecds.kubeconfig (the token of the ServiceAccount-like user
#   system:serviceaccount:wasm-ecds:wasm-ecds, which can do only what RBAC grants it) and
#   STATE_DIR/env (KUBECONFIG=..., API_PORT=..., ETCD_PORT=...).
# stop: kills the PIDs it recorded.
# stop-apiserver / start-apiserver: kill (SIGKILL) or start the API server alone, on the same port
#   (etcd keeps the data): an outage the watches must survive.
set -euo pipefail
STATE=${1:?state dir}; CMD=${2:-start}
KUBE_BIN=${KUBE_BIN:-${KUBE_CACHE:-/var/cache/wasm-ecds/kube}/bin}
mkdir -p "$STATE"; STATE=$(cd "$STATE" && pwd)
P="$STATE/pki"

stop_pids() {  # SIGNAL NAME...
  local sig=$1; shift
  for p in "$@"; do
    [ -f "$STATE/$p.pid" ] && kill "-$sig" "$(cat "$STATE/$p.pid")" 2>/dev/null || true
  done
  for p in "$@"; do
    [ -f "$STATE/$p.pid" ] || continue
    pid=$(cat "$STATE/$p.pid"); for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true; rm -f "$STATE/$p.pid"
  done
}

start_apiserver() {  # returns 2 when its port was taken meanwhile (the caller picks another)
  local from=0
  if [ -f "$STATE/apiserver.log" ]; then from=$(wc -l < "$STATE/apiserver.log"); fi
  "$KUBE_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
    --cert-dir="$STATE/apiserver-certs" \
    --tls-cert-file="$P/server.crt" --tls-private-key-file="$P/server.key" \
    --client-ca-file="$P/ca.crt" --token-auth-file="$P/tokens.csv" \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
    --authorization-mode=RBAC \
    >> "$STATE/apiserver.log" 2>&1 &
  echo $! > "$STATE/apiserver.pid"
  local ok=""
  for _ in $(seq 600); do   # up to 60 s (observed: ~4 s)
    if [ "$(curl -s --cacert "$P/ca.crt" "https://127.0.0.1:$API_PORT/readyz" 2>/dev/null)" = ok ]; then ok=1; break; fi
    kill -0 "$(cat "$STATE/apiserver.pid")" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$ok" ]; then
    if tail -n +"$((from + 1))" "$STATE/apiserver.log" | grep -q 'address already in use'; then
      return 2
    fi
    echo "kube-apiserver did not become ready; see $STATE/apiserver.log" >&2
    tail -20 "$STATE/apiserver.log" >&2; exit 1
  fi
}

case "$CMD" in
  stop) stop_pids TERM apiserver etcd; exit 0 ;;
  # A crash, not a graceful shutdown: connections just break.
  stop-apiserver) stop_pids KILL apiserver; exit 0 ;;
  start-apiserver)
    # shellcheck disable=SC1091
    . "$STATE/env"; start_apiserver || { echo "kube-apiserver: port $API_PORT is taken" >&2; exit 1; }; exit 0 ;;
  start) ;;
  *) echo "usage: $0 STATE_DIR [start|stop|stop-apiserver|start-apiserver]" >&2; exit 2 ;;
esac

free_port() {  # random unused loopback port
  local p
  while :; do
    p=$(( 20000 + RANDOM % 30000 ))
    (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo $p; return; }
  done
}

# --- PKI (openssl): CA, serving cert for 127.0.0.1/localhost, admin client cert (system:masters), SA keys
mkdir -p "$P"
if [ ! -f "$P/admin.crt" ]; then
  ( cd "$P"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=wasm-ecds-test-ca" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' > server.ext
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' > client.ext
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 -extfile server.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    { echo "wasm-ecds-test-token,admin,admin,system:masters"
      echo 'wasm-ecds-sa-token,system:serviceaccount:wasm-ecds:wasm-ecds,wasm-ecds-sa,"system:serviceaccounts,system:serviceaccounts:wasm-ecds"'
    } > tokens.csv )
fi

# etcd on free ports; a port taken between the check and the bind (another test starting its own
# cluster) is retried on new ports.
etcd_ok=""
for attempt in 1 2 3; do
  ETCD_PORT=$(free_port); ETCD_PEER=$(free_port)
  rm -rf "$STATE/etcd-data"
  "$KUBE_BIN/etcd" --name test --data-dir "$STATE/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "test=http://127.0.0.1:$ETCD_PEER" --unsafe-no-fsync \
    > "$STATE/etcd.log" 2>&1 &
  echo $! > "$STATE/etcd.pid"
  for _ in $(seq 200); do   # up to 20 s
    if curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null; then etcd_ok=1; break; fi
    kill -0 "$(cat "$STATE/etcd.pid")" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$etcd_ok" ] && break
  echo "etcd did not start (attempt $attempt):" >&2; tail -5 "$STATE/etcd.log" >&2
  stop_pids KILL etcd
done
[ -n "$etcd_ok" ] || { echo "etcd did not start; see $STATE/etcd.log" >&2; exit 1; }
# free_port only finds a port free now: another process may take it before the apiserver binds.
for attempt in 1 2 3; do
  API_PORT=$(free_port)
  if start_apiserver; then break; fi
  [ "$attempt" -lt 3 ] || { echo "kube-apiserver: its port was taken 3 times" >&2; exit 1; }
done

b64() { base64 -w0 < "$1"; }
cat > "$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(b64 "$P/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$P/admin.crt")
    client-key-data: $(b64 "$P/admin.key")
- name: admin-token
  user:
    token: wasm-ecds-test-token
contexts:
- name: test
  context: {cluster: test, user: admin, namespace: default}
- name: test-token
  context: {cluster: test, user: admin-token, namespace: default}
current-context: test
EOF
cat > "$STATE/wasm-ecds.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(b64 "$P/ca.crt")
users:
- name: wasm-ecds
  user:
    token: wasm-ecds-sa-token
contexts:
- name: wasm-ecds
  context: {cluster: test, user: wasm-ecds, namespace: wasm-ecds}
current-context: wasm-ecds
EOF
printf 'KUBECONFIG=%s\nAPI_PORT=%s\nETCD_PORT=%s\n' "$STATE/kubeconfig" "$API_PORT" "$ETCD_PORT" > "$STATE/env"
echo "ready: https://127.0.0.1:$API_PORT  KUBECONFIG=$STATE/kubeconfig" >&2
