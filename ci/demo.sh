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

echo "== starting alloydb-auth-proxy"
.venv/bin/alloydb-auth-proxy "$INSTANCE" --port "$PORT" --auto-iam-authn \
    --alloydbadmin-api-endpoint "http://127.0.0.1:$ADMIN_PORT" --token "$TOKEN" \
    >"$work/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do grep -q "ready for new connections" "$work/proxy.log" && break; sleep 0.1; done
cat "$work/proxy.log"
grep -q "ready for new connections" "$work/proxy.log" || exit 1

echo "== psql through the proxy as the IAM user demo-sa@demo-project.iam (no password)"
psql -X "host=127.0.0.1 port=$PORT user=demo-sa@demo-project.iam dbname=app" \
    -c "SELECT current_user, version()"
echo "== the proxy's log"
cat "$work/proxy.log"
