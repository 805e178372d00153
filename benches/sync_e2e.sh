#!/usr/bin/env bash
# End-to-end benchmark: `sluice sync` of generated invoice CSVs into the embedded SQLite
# warehouse, for 1M and 5M rows (override with SIZES="..."), against the sqlite3 shell's
# `.import` of the same file into a table of the same shape with the same primary key,
# measured in the same run. Reports rows/s, peak RSS and the ratios.
#
# Usage: benches/sync_e2e.sh            (needs sqlite3 and /usr/bin/time; builds --release)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="${SIZES:-1000000 5000000}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/sluice"

measure() { # prints "seconds max_rss_kb" of the command
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }
    cat "$WORK/time"
}

printf "%-9s %-14s %10s %12s %12s\n" rows tool seconds rows/s peak_rss_mb
for n in $SIZES; do
    csv="$WORK/invoices_$n.csv"
    awk -v n="$n" -f benches/gen_invoices.awk >"$csv"
    cat >"$WORK/p.toml" <<TOML
name = "bench"
tenant = "bench"
entity = "invoices"
[source]
kind = "csv"
path = "$csv"
TOML
    rm -rf "$WORK/data"
    read -r s rss < <(measure "$BIN" --data-dir "$WORK/data" sync "$WORK/p.toml" --json)
    grep -q '"status":"succeeded"' "$WORK/out" || { cat "$WORK/out"; exit 1; }
    printf "%-9s %-14s %10s %12.0f %12.1f\n" "$n" "sluice sync" "$s" "$(echo "$n / $s" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
    sluice_s=$s; sluice_rss=$rss

    rm -f "$WORK/base.sqlite"
    sqlite3 "$WORK/base.sqlite" "PRAGMA journal_mode=WAL; CREATE TABLE invoices (external_id TEXT, doc_number TEXT, customer_id TEXT, customer_name TEXT, issue_date TEXT, due_date TEXT, currency TEXT, total TEXT, balance TEXT, status TEXT, kind TEXT, updated_at TEXT, PRIMARY KEY (external_id) ON CONFLICT REPLACE) WITHOUT ROWID;" >/dev/null
    read -r s rss < <(measure sqlite3 "$WORK/base.sqlite" -cmd ".mode csv" ".import --skip 1 $csv invoices")
    printf "%-9s %-14s %10s %12.0f %12.1f\n" "$n" "sqlite3 import" "$s" "$(echo "$n / $s" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
    printf "%-9s ratio sluice/sqlite3 rows/s: %.2f\n" "$n" "$(echo "$s / $sluice_s" | bc -l)"
    echo "$n $sluice_rss" >>"$WORK/rss"
done
if [ "$(wc -l <"$WORK/rss")" -ge 2 ]; then
    first=$(head -1 "$WORK/rss" | cut -d' ' -f2); last=$(tail -1 "$WORK/rss" | cut -d' ' -f2)
    printf "peak RSS growth from %s to %s rows: %.2fx\n" "$(head -1 "$WORK/rss" | cut -d' ' -f1)" "$(tail -1 "$WORK/rss" | cut -d' ' -f1)" "$(echo "$last / $first" | bc -l)"
fi
