#!/usr/bin/env bash
# End-to-end benchmark of the SQL sources: `sluice sync` of a 1M-row invoice table from
# PostgreSQL and from MariaDB into the PostgreSQL warehouse (incremental by
# updated_at, id), against pgloader moving the same table into PostgreSQL on the same
# machine in the same run. Then sluice's peak RSS reading 200k and 2M rows (flat memory).
#
# Usage: benches/sql_e2e.sh   (needs psql, mariadb, pgloader, /usr/bin/time; ROWS=1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${ROWS:-1000000}"
PG="${SLUICE_BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
PGBASE="${PG%/*}"
MY="${SLUICE_BENCH_MYSQL_URL:-mysql://root@127.0.0.1:3306}"
SRC="sluice_srcbench_$$"; WH="sluice_whbench_$$"; DST="sluice_dstbench_$$"
WORK="$(mktemp -d)"
cleanup() {
    for db in "$SRC" "$WH" "$DST"; do psql "$PG" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; done
    mariadb -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $SRC" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/sluice"
export SLUICE_MASTER_KEY="${SLUICE_MASTER_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"

measure() { # prints "seconds max_rss_kb" of the command
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || { cat "$WORK/err" "$WORK/out" >&2; exit 1; }
    grep -q "Heap exhausted" "$WORK/out" "$WORK/err" && { echo "$1 ran out of heap" >&2; exit 1; }
    cat "$WORK/time"
}

pg_source() { # $1 rows
    psql "$PG" -qc "DROP DATABASE IF EXISTS $SRC WITH (FORCE)" -c "CREATE DATABASE $SRC" >/dev/null
    psql "$PGBASE/$SRC" -qc "CREATE TABLE src_invoices (id bigint PRIMARY KEY, external_id text NOT NULL, issue_date date NOT NULL, due_date date NOT NULL, currency char(3) NOT NULL, total numeric(12,2) NOT NULL, balance numeric(12,2) NOT NULL, updated_at timestamp NOT NULL)" \
        -c "INSERT INTO src_invoices SELECT g, 'INV-' || lpad(g::text, 8, '0'), date '2024-03-01' + g % 28, date '2024-04-01' + g % 28, (ARRAY['USD','EUR','GBP'])[1 + g % 3], 100 + g % 100000 + 0.5, (100 + g % 100000) / 2 + 0.25, timestamp '2024-05-01' + g * interval '1 second' FROM generate_series(1, $1) g" \
        -c "CREATE INDEX ON src_invoices (updated_at, id)" >/dev/null
}

warehouse() {
    psql "$PG" -qc "DROP DATABASE IF EXISTS $WH WITH (FORCE)" -c "CREATE DATABASE $WH" >/dev/null
    "$BIN" --database-url "$PGBASE/$WH" migrate >/dev/null
    "$BIN" --database-url "$PGBASE/$WH" tenant create bench >/dev/null
}

pipeline() { # $1 kind, $2 url
    printf 'name = "erp"\ntenant = "bench"\nentity = "invoices"\n[source]\nkind = "%s"\nurl = "%s"\ntable = "src_invoices"\ncursor = ["updated_at", "id"]\n' "$1" "$2" >"$WORK/p.toml"
}

row() { printf "%-26s %10s %12.0f %12.1f\n" "$1" "$2" "$(echo "$ROWS / $2" | bc -l)" "$(echo "$3 / 1024" | bc -l)"; }

printf "%-26s %10s %12s %12s\n" "$ROWS rows" seconds rows/s peak_rss_mb
# PostgreSQL -> PostgreSQL
pg_source "$ROWS"
warehouse; pipeline postgres "$PGBASE/$SRC"
read -r s rss < <(measure "$BIN" --database-url "$PGBASE/$WH" sync "$WORK/p.toml" --json); row "sluice pg->pg" "$s" "$rss"; a=$s
psql "$PG" -qc "DROP DATABASE IF EXISTS $DST WITH (FORCE)" -c "CREATE DATABASE $DST" >/dev/null
# pgloader's default prefetch (100k rows) exhausts its SBCL heap at 1M rows here; 10k does not.
PGL=(pgloader --with "prefetch rows = 10000" --with "batch rows = 10000")
read -r s rss < <(measure "${PGL[@]}" "$PGBASE/$SRC" "$PGBASE/$DST"); row "pgloader pg->pg" "$s" "$rss"
printf "ratio sluice/pgloader rows/s (pg->pg): %.2f\n" "$(echo "$s / $a" | bc -l)"

# MariaDB -> PostgreSQL
mariadb -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $SRC; CREATE DATABASE $SRC; USE $SRC; \
  CREATE TABLE src_invoices (id bigint PRIMARY KEY, external_id varchar(20) NOT NULL, issue_date date NOT NULL, due_date date NOT NULL, currency char(3) NOT NULL, total decimal(12,2) NOT NULL, balance decimal(12,2) NOT NULL, updated_at datetime NOT NULL, KEY (updated_at, id)); \
  INSERT INTO src_invoices SELECT seq, CONCAT('INV-', LPAD(seq, 8, '0')), DATE('2024-03-01') + INTERVAL (seq % 28) DAY, DATE('2024-04-01') + INTERVAL (seq % 28) DAY, ELT(1 + seq % 3, 'USD', 'EUR', 'GBP'), 100 + seq % 100000 + 0.5, (100 + seq % 100000) DIV 2 + 0.25, TIMESTAMP('2024-05-01') + INTERVAL seq SECOND FROM seq_1_to_$ROWS;"
warehouse; pipeline mysql "$MY/$SRC"
read -r s rss < <(measure "$BIN" --database-url "$PGBASE/$WH" sync "$WORK/p.toml" --json); row "sluice mariadb->pg" "$s" "$rss"; a=$s
psql "$PG" -qc "DROP DATABASE IF EXISTS $DST WITH (FORCE)" -c "CREATE DATABASE $DST" >/dev/null
read -r s rss < <(measure "${PGL[@]}" "$MY/$SRC" "$PGBASE/$DST"); row "pgloader mariadb->pg" "$s" "$rss"
printf "ratio sluice/pgloader rows/s (mariadb->pg): %.2f\n" "$(echo "$s / $a" | bc -l)"

# Memory: 200k vs 2M rows from PostgreSQL.
for n in 200000 2000000; do
    pg_source "$n"; warehouse; pipeline postgres "$PGBASE/$SRC"
    read -r s rss < <(measure "$BIN" --database-url "$PGBASE/$WH" sync "$WORK/p.toml" --json)
    printf "sluice pg->pg %8s rows: %6.2f s, peak RSS %.1f MB\n" "$n" "$s" "$(echo "$rss / 1024" | bc -l)"
done
