#!/usr/bin/env bash
# The README's demo: set up (ci/install.sh), start the bundled AlloyDB emulator
# (with its own temporary PostgreSQL), start alloydb-auth-proxy against it and
# run queries through the proxy with psql: once with a password (DB_NATIVE) and
# once with automatic IAM login. Every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh

INSTANCE=projects/demo-project/locations/us-central1/clusters/demo/instances/primary
TOKEN=demo-token
SA=demo-sa@demo-project.iam.gserviceaccount.com
PORT=${PORT:-5432}
ADMIN_PORT=${ADMIN_PORT:-8088}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting the AlloyDB emulator (Admin API on 127.0.0.1:$ADMIN_PORT)"
.venv/bin/alloydb-emulator --instance "$INSTANCE" --token "$TOKEN=$SA" \
    --admin-port "$ADMIN_PORT" --state-file "$work/state.json" >"$work/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do [ -s "$work/state.json" ] && break; sleep 0.1; done
[ -s "$work/state.json" ] || { cat "$work/emulator.log"; exit 1; }

start_proxy() {  # start_proxy PORT LOG [flags...]
    local port=$1 log=$2; shift 2
    .venv/bin/alloydb-auth-proxy "$INSTANCE" --port "$port" "$@" \
        --alloydbadmin-api-endpoint "http://127.0.0.1:$ADMIN_PORT" --token "$TOKEN" >"$log" 2>&1 &
    pids+=($!)
    for _ in $(seq 300); do grep -q "ready for new connections" "$log" && break; sleep 0.1; done
    cat "$log"
    grep -q "ready for new connections" "$log"
}

echo "== starting alloydb-auth-proxy (database user and password)"
start_proxy "$PORT" "$work/proxy.log"
echo "== psql through the proxy as app/app"
PGPASSWORD=app psql -X "host=127.0.0.1 port=$PORT user=app dbname=app" \
    -c "SELECT current_user, inet_server_port() AS postgres_port, version()"

echo "== starting a second alloydb-auth-proxy with --auto-iam-authn"
start_proxy "$((PORT + 1))" "$work/proxy-iam.log" --auto-iam-authn
echo "== psql through it as the IAM user demo-sa@demo-project.iam, no password"
psql -X -w "host=127.0.0.1 port=$((PORT + 1)) user=demo-sa@demo-project.iam dbname=app" \
    -c "SELECT current_user"

echo "== the proxies' logs"
cat "$work/proxy.log" "$work/proxy-iam.log"
