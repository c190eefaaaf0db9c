#!/usr/bin/env bash
# install-kube.sh — provide etcd, etcdctl, kubectl and kube-apiserver for the Kubernetes-source
# tests (scripts/test.sh runs it),
# using ONLY Debian bookworm packages (no GitHub downloads, no Go module proxy).
#
#   etcd           : Debian binary package etcd-server (3.4.23)
#   kube-apiserver : built from Debian's `kubernetes` source package
#                    (1.20.5+really1.20.2, full vendor/ tree) with Debian's golang-go (1.19),
#                    GOPATH mode, fully offline. Go >= 1.18 needs reflect2 >= 1.0.2, so the
#                    vendored reflect2 1.0.1 is replaced by Debian's golang-github-modern-go-reflect2-dev.
#
# Idempotent: the built binary is cached OUTSIDE the repo clone in $KUBE_CACHE (default
# /var/cache/wasm-ecds/kube); a rerun with a valid cache takes < 1 s (plus apt if packages are missing).
# Prints the bin dir on stdout as the last line ("KUBE_BIN=...").
set -euo pipefail

KUBE_CACHE=${KUBE_CACHE:-/var/cache/wasm-ecds/kube}
K8S_SRC_VERSION=${K8S_SRC_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}   # bookworm's kubernetes source
STAMP="k8s=${K8S_SRC_VERSION};reflect2=debian;v2"
BIN="$KUBE_CACHE/bin"
log() { echo "[install-kube] $*" >&2; }

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need_pkgs=()
for p in etcd-server etcd-client golang-go golang-github-modern-go-reflect2-dev make rsync jq dpkg-dev openssl curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "apt-get install ${need_pkgs[*]}"
  $SUDO apt-get update -qq >&2 || true
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

mkdir -p "$BIN"
ln -sf /usr/bin/etcd "$BIN/etcd"
ln -sf /usr/bin/etcdctl "$BIN/etcdctl"

# kubectl 1.20.2 from Debian's kubernetes-client .deb, unpacked into the cache (not installed, so it
# never clashes with another /usr/bin/kubectl). The tests apply manifests and patch with it.
if ! [ -x "$BIN/kubectl" ]; then
  tmp=$(mktemp -d); chmod 755 "$tmp"
  ( cd "$tmp" && apt-get download kubernetes-client >&2 && dpkg-deb -x kubernetes-client_*.deb x ) \
    && install -m 0755 "$tmp/x/usr/bin/kubectl" "$BIN/kubectl" || log "warning: no Debian kubectl"
  rm -rf "$tmp"
fi

if [ -x "$BIN/kube-apiserver" ] && [ "$(cat "$BIN/.stamp" 2>/dev/null)" = "$STAMP" ] \
   && "$BIN/kube-apiserver" --version >/dev/null 2>&1; then
  log "cached: $("$BIN/kube-apiserver" --version)"
  echo "KUBE_BIN=$BIN"; exit 0
fi

t0=$(date +%s)
WORK="$KUBE_CACHE/build"
rm -rf "$WORK"; mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/archives/partial"; chmod -R 755 "$WORK"

# Private apt config: the machine's own bookworm mirrors (from /etc/apt) as deb-src, without
# touching /etc/apt.
{
  { cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } | awk '/^URIs:/ { print $2 }'
  { grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | awk '{ print $2 }'
} | sort -u | while read -r uri; do
  case "$uri" in
    *-security*) echo "deb-src $uri bookworm-security main" ;;
    *) echo "deb-src $uri bookworm main"; echo "deb-src $uri bookworm-updates main" ;;
  esac
done > "$WORK/apt/sources.list"
[ -s "$WORK/apt/sources.list" ] || { log "error: no apt mirror configured in /etc/apt"; exit 1; }
APTO=(-o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
      -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache::Archives=$WORK/apt/archives"
      -o "APT::Sandbox::User=root")
log "fetching Debian source package kubernetes=$K8S_SRC_VERSION"
apt-get "${APTO[@]}" update -qq >&2
( cd "$WORK" && apt-get "${APTO[@]}" source --download-only "kubernetes=$K8S_SRC_VERSION" >&2 )
( cd "$WORK" && dpkg-source -x --no-check kubernetes_*.dsc k8s >&2 )
SRC="$WORK/k8s"

# Go >= 1.18 + reflect2 1.0.1 => SIGSEGV in map iteration (json-iterator) on first CR write.
rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
cp -a /usr/share/gocode/src/github.com/modern-go/reflect2 "$SRC/vendor/github.com/modern-go/reflect2"
rm -rf "$SRC/vendor/github.com/modern-go/reflect2/.git" "$SRC/vendor/github.com/modern-go/reflect2"/*_test.go

cat > "$WORK/version.env" <<'EOF'
KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
KUBE_GIT_TREE_STATE=clean
KUBE_GIT_VERSION=v1.20.2
KUBE_GIT_MAJOR=1
KUBE_GIT_MINOR=20
EOF

log "building kube-apiserver (2 cores: ~5-6 min cold)"
(
  cd "$SRC"
  export PATH="/usr/lib/go/bin:$PATH"   # Debian golang-go (1.19); newer Go is untested with k8s 1.20
  export GOCACHE="$KUBE_CACHE/go-build" GOPROXY=off GOFLAGS= GO111MODULE=off CGO_ENABLED=0 \
         GOLDFLAGS="-s -w" KUBE_GIT_VERSION_FILE="$WORK/version.env" HOME="$WORK/home"
  mkdir -p "$HOME"
  make WHAT=cmd/kube-apiserver >&2
)
install -m 0755 "$SRC/_output/bin/kube-apiserver" "$BIN/kube-apiserver"
echo "$STAMP" > "$BIN/.stamp"
rm -rf "$WORK" "$KUBE_CACHE/go-build"    # ~1.5 GB; keep only the 105 MB binary
log "built $("$BIN/kube-apiserver" --version) in $(( $(date +%s) - t0 ))s"
echo "KUBE_BIN=$BIN"
