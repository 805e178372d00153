#!/usr/bin/env bash
# End-to-end benchmark: `sluice sync` of a generated invoice CSV into the PostgreSQL
# warehouse against `psql \copy` of the same file, measured in the same run, into two
# baseline tables:
#   plain     the file's 12 columns with their types and external_id as primary key;
#   shaped    a copy of the warehouse table (LIKE tenant_bench.invoices INCLUDING ALL: the
#             same columns, primary key (source, external_id) and index), its bookkeeping
#             columns (source, loaded_at, run_id, row_hash) filled by defaults.
# Sizes default to 1M and 5M rows (SIZES="..."). The file has no repeated ids, so a plain
# COPY accepts it. GEN=invoices (default: gen_invoices.awk, 28 days, 5,000 customers in
# lockstep) or GEN=books (gen_books.awk: two years of dates, skewed customers each in its
# own currency, amounts over four orders of magnitude, part payments: real books' shape).
#
# Usage: benches/pg_e2e.sh     (PostgreSQL at SLUICE_BENCH_PG_URL, default
#                               postgres://postgres@127.0.0.1:5432/postgres; builds --release)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="${SIZES:-1000000 5000000}"
GEN="${GEN:-invoices}"
case "$GEN" in
    invoices) GEN_ARGS=(-v dups=0 -f benches/gen_invoices.awk) ;;
    books) GEN_ARGS=(-v seed=7 -f benches/gen_books.awk) ;;
    *) echo "GEN must be invoices or books" >&2; exit 2 ;;
esac
ADMIN="${SLUICE_BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="sluice_bench_$$"
URL="${ADMIN%/*}/$DB"
WORK="$(mktemp -d)"
cleanup() { psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/sluice"
export SLUICE_MASTER_KEY="${SLUICE_MASTER_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"

measure() { # prints "seconds max_rss_kb" of the command
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || { cat "$WORK/err" "$WORK/out"; exit 1; }
    cat "$WORK/time"
}

echo "data: $GEN"
printf "%-9s %-12s %10s %12s %12s\n" rows tool seconds rows/s peak_rss_mb
for n in $SIZES; do
    psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
    "$BIN" --database-url "$URL" migrate >/dev/null
    "$BIN" --database-url "$URL" tenant create bench >/dev/null
    csv="$WORK/invoices.csv"
    awk -v n="$n" "${GEN_ARGS[@]}" >"$csv"
    printf 'name = "bench"\ntenant = "bench"\nentity = "invoices"\n[source]\nkind = "csv"\npath = "%s"\n' "$csv" >"$WORK/p.toml"

    read -r s rss < <(measure "$BIN" --database-url "$URL" sync "$WORK/p.toml" --json)
    grep -q '"status":"succeeded"' "$WORK/out" || { cat "$WORK/out"; exit 1; }
    printf "%-9s %-12s %10s %12.0f %12.1f\n" "$n" "sluice sync" "$s" "$(echo "$n / $s" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
    sluice_s=$s
    echo "$n $rss" >>"$WORK/rss"

    psql "$URL" -qc "CREATE TABLE baseline (external_id text PRIMARY KEY, doc_number text, customer_id text, customer_name text, issue_date date, due_date date, currency text, total numeric(18,4), balance numeric(18,4), status text, kind text, updated_at timestamptz)" >/dev/null
    read -r s rss < <(measure psql "$URL" -qc "\\copy baseline FROM '$csv' WITH (FORMAT csv, HEADER true)")
    printf "%-9s %-12s %10s %12.0f %12.1f\n" "$n" "copy plain" "$s" "$(echo "$n / $s" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
    plain_s=$s
    psql "$URL" -qc "CREATE TABLE shaped (LIKE tenant_bench.invoices INCLUDING ALL)" \
        -c "ALTER TABLE shaped ALTER source SET DEFAULT 'bench', ALTER loaded_at SET DEFAULT now(), ALTER run_id SET DEFAULT 'baseline', ALTER row_hash SET DEFAULT '\\x00'" >/dev/null
    read -r s rss < <(measure psql "$URL" -qc "\\copy shaped (external_id, doc_number, customer_id, customer_name, issue_date, due_date, currency, total, balance, status, kind, updated_at) FROM '$csv' WITH (FORMAT csv, HEADER true)")
    printf "%-9s %-12s %10s %12.0f %12.1f\n" "$n" "copy shaped" "$s" "$(echo "$n / $s" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
    printf "%-9s ratio sluice/psql rows/s: %.2f (plain table), %.2f (warehouse-shaped table)\n" "$n" "$(echo "$plain_s / $sluice_s" | bc -l)" "$(echo "$s / $sluice_s" | bc -l)"
done
if [ "$(wc -l <"$WORK/rss")" -ge 2 ]; then
    first=$(head -1 "$WORK/rss" | cut -d' ' -f2); last=$(tail -1 "$WORK/rss" | cut -d' ' -f2)
    printf "sluice peak RSS growth from %s to %s rows: %.2fx\n" "$(head -1 "$WORK/rss" | cut -d' ' -f1)" "$(tail -1 "$WORK/rss" | cut -d' ' -f1)" "$(echo "$last / $first" | bc -l)"
fi
