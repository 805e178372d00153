#!/usr/bin/env bash
# The API under load: `sluice serve` (PostgreSQL warehouse, Redis queue, its own worker
# plus WORKERS worker processes) with PIPELINES pipelines on a cron every few seconds, each
# a CSV of ROWS invoices (about 1% of them quarantined), so syncs run all along; meanwhile
# wrk drives CLIENTS concurrent connections for DURATION over lists, triggers and
# quarantine reads (benches/api_load.lua). The same run first measures /health, the
# server's floor, with the same clients. Prints throughput, p50/p90/p99 latency, answers by
# status, and the runs and rows the syncs went through meanwhile; fails on any 5xx.
#
# The per-key rate limit (100/s by default) is raised for the run: one key drives all the
# clients here, and the figure sought is the server's, not the limiter's.
#
# Usage: benches/api_load.sh   (CLIENTS=200 DURATION=60s PIPELINES=20 ROWS=20000 WORKERS=3;
#                               PostgreSQL at SLUICE_BENCH_PG_URL, Redis at SLUICE_BENCH_REDIS_URL)
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS="${CLIENTS:-200}"
DURATION="${DURATION:-60s}"
PIPELINES="${PIPELINES:-20}"
ROWS="${ROWS:-20000}"
WORKERS="${WORKERS:-3}"
ADMIN="${SLUICE_BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
REDIS="${SLUICE_BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
DB="sluice_load_$$"
URL="${ADMIN%/*}/$DB"
PREFIX="load$$"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    redis-cli -u "$REDIS" --scan --pattern "$PREFIX:*" | xargs -r redis-cli -u "$REDIS" del >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null 2>&1 || sudo apt-get install -y -qq wrk; }
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/sluice"
export SLUICE_MASTER_KEY="${SLUICE_MASTER_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
export SLUICE_DATABASE_URL="$URL" SLUICE_REDIS_URL="$REDIS" SLUICE_QUEUE_PREFIX="$PREFIX" SLUICE_LOG=warn
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

psql "$ADMIN" -qc "CREATE DATABASE $DB" >/dev/null
"$BIN" migrate >/dev/null
"$BIN" tenant create load >/dev/null
KEY=$("$BIN" key create --tenant load --role admin)
for i in $(seq 1 "$PIPELINES"); do
    name=$(printf 'p%02d' "$i")
    awk -v n="$ROWS" -f benches/gen_invoices.awk >"$WORK/$name.csv"
    printf 'name = "%s"\ntenant = "load"\nentity = "invoices"\n[source]\nkind = "csv"\npath = "%s"\n[schedule]\ncron = "*/%d * * * * *"\n' \
        "$name" "$WORK/$name.csv" $((5 + i % 5)) >"$WORK/$name.toml"
    "$BIN" trigger "$WORK/$name.toml" >/dev/null
done
"$BIN" serve --listen "127.0.0.1:$PORT" --rate-per-key 1000000 --burst-per-key 1000000 2>"$WORK/serve.log" &
PIDS+=($!)
for _ in $(seq 1 "$WORKERS"); do
    "$BIN" worker --concurrency 1 2>>"$WORK/workers.log" &
    PIDS+=($!)
done
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
sleep 5 # the first syncs under way

runs() { psql "$URL" -tAc "SELECT count(*), coalesce(sum(rows_read), 0) FROM tenant_load.runs WHERE status <> 'running'"; }
echo "== floor: GET /health, $CLIENTS clients, 10s"
wrk -t2 -c"$CLIENTS" -d10s --latency "http://127.0.0.1:$PORT/health" | grep -E "Requests/sec|^ +(50|90|99)%|Non-2xx|Socket errors" || true
echo "== API mix: $CLIENTS clients, $DURATION, $PIPELINES pipelines syncing"
before=$(runs)
wrk -t2 -c"$CLIENTS" -d"$DURATION" --timeout 10s -s benches/api_load.lua "http://127.0.0.1:$PORT" -- "$KEY" "$PIPELINES" | tee "$WORK/wrk.out" | grep -vE "^ +(Latency|Req/Sec)|Thread Stats|^Running|threads and"
after=$(runs)
if [ -n "${PER_ROUTE:-}" ]; then
    for k in 0 1 2 3 4 5; do
        echo "== route $k alone (0 pipelines, 1 runs, 2 sync, 3 quarantine, 4 quarantine/stats, 5 dead-letters), 10s"
        wrk -t2 -c"$CLIENTS" -d10s --timeout 10s -s benches/api_load.lua "http://127.0.0.1:$PORT" -- "$KEY" "$PIPELINES" "$k" | grep -E "^(requests/s|p50|p99|server errors)"
    done
fi
echo "runs finished meanwhile: $(( ${after%|*} - ${before%|*} )), rows read by them: $(( ${after#*|} - ${before#*|} ))"
errors=$(sed -n 's/^server errors: //p' "$WORK/wrk.out")
if [ "${errors:-1}" != "0" ]; then
    echo "FAIL: $errors answers were 5xx"; tail -20 "$WORK/serve.log"; exit 1
fi
