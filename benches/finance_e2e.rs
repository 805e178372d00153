//! The finance dashboard on PostgreSQL with 1M invoices, 1M bills and 1M payments: p50 and
//! p99 latency of `sluice_finance::dashboard` against the same aggregates written as one
//! hand-written SQL query run by `psql` (with `\timing`), in the same run.
//!
//! `cargo bench --bench finance_e2e` (needs PostgreSQL and psql; SLUICE_BENCH_ROWS changes
//! the size, SLUICE_BENCH_RUNS the dashboard's repetitions, SLUICE_BENCH_SLOW_RUNS those of
//! the whole-table computations). Also measured: the first dashboard after a load and
//! after a small change (when the anomaly counts are computed again), and the same
//! aggregates as hand-written SQL over the rollups. (What keeping the rollups costs a load
//! is measured by `pg_e2e.sh`, against `psql \copy`.) Every payment is applied to one document, so the SQL's overpayment check (a
//! window sum per document) is the dashboard's definition.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use sluice_engine::TenantSlug;
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_finance::AnomalyOptions;
use sluice_pipelines::{PipelineSource, PipelineSpec, Quiet, RunOptions, run_pipeline};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

const MASTER: &str = "4f6e6520737472696e6720746f2072756c65207468656d20616c6c2c206f6e65";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn write_files(dir: &std::path::Path, rows: usize) {
    let mut rng = Rng(0x5eed);
    let cur = ["USD", "EUR", "GBP"];
    let start = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
    let mut inv =
        std::io::BufWriter::new(std::fs::File::create(dir.join("invoices.csv")).expect("csv"));
    let mut bills =
        std::io::BufWriter::new(std::fs::File::create(dir.join("bills.csv")).expect("csv"));
    let mut pays =
        std::io::BufWriter::new(std::fs::File::create(dir.join("payments.csv")).expect("csv"));
    writeln!(inv, "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at").expect("w");
    writeln!(bills, "external_id,doc_number,vendor_id,vendor_name,issue_date,due_date,currency,total,balance,status,kind,category,updated_at").expect("w");
    writeln!(
        pays,
        "external_id,direction,counterparty_id,date,amount,currency,applied_to"
    )
    .expect("w");
    for i in 0..rows {
        for (w, side) in [(&mut inv, "I"), (&mut bills, "B")] {
            let c = cur[i % 3];
            let issue = start + chrono::Duration::days(rng.below(366) as i64);
            let due = issue + chrono::Duration::days(30);
            let cents = 1000 + rng.below(500_000);
            let status = ["open", "paid", "void"][rng.below(3) as usize];
            let kind = if rng.below(20) == 0 {
                "credit_note"
            } else if side == "I" {
                "invoice"
            } else {
                "bill"
            };
            let balance = if status == "paid" { 0 } else { cents };
            let doc = rng.below(rows as u64);
            let who = rng.below(2000);
            if side == "I" {
                writeln!(w, "I{i},N{doc},C{who},Customer {who},{issue},{due},{c},{}.{:02},{}.{:02},{status},{kind},2024-01-01T00:00:00Z",
                    cents / 100, cents % 100, balance / 100, balance % 100).expect("w");
            } else {
                let category = if rng.below(2) == 0 { "cogs" } else { "expense" };
                writeln!(w, "B{i},N{doc},V{who},Vendor {who},{issue},{due},{c},{}.{:02},{}.{:02},{status},{kind},{category},2024-01-01T00:00:00Z",
                    cents / 100, cents % 100, balance / 100, balance % 100).expect("w");
            }
        }
        let (dir_, prefix) = if rng.below(2) == 0 {
            ("in", "I")
        } else {
            ("out", "B")
        };
        let target = rng.below(rows as u64);
        let c = cur[(target % 3) as usize];
        let date = start + chrono::Duration::days(rng.below(366) as i64);
        let cents = 1000 + rng.below(300_000);
        writeln!(
            pays,
            "P{i},{dir_},X,{date},{}.{:02},{c},{prefix}{target}",
            cents / 100,
            cents % 100
        )
        .expect("w");
    }
}

fn hand_sql(schema: &str, as_of: &str, from: &str, to: &str) -> String {
    let signed = "CASE WHEN kind = 'credit_note' THEN -total ELSE total END";
    let open = "CASE WHEN kind = 'credit_note' THEN -balance ELSE balance END";
    let buckets = |src: &str, alias: &str| {
        format!(
            "{alias} AS (SELECT currency, \
               SUM({open}) FILTER (WHERE d <= 0) AS cur, SUM({open}) FILTER (WHERE d BETWEEN 1 AND 30) AS d30, \
               SUM({open}) FILTER (WHERE d BETWEEN 31 AND 60) AS d60, SUM({open}) FILTER (WHERE d BETWEEN 61 AND 90) AS d90, \
               SUM({open}) FILTER (WHERE d > 90) AS d99 \
             FROM (SELECT currency, kind, balance, DATE '{as_of}' - due_date AS d FROM {schema}.{src} \
                   WHERE balance > 0 AND status <> 'void' AND deleted_at IS NULL) x GROUP BY currency)"
        )
    };
    format!(
        "WITH \
         flow AS (SELECT currency, SUM(amount) FILTER (WHERE direction = 'in') AS inflow, \
                         SUM(amount) FILTER (WHERE direction = 'out') AS outflow \
                  FROM {schema}.payments WHERE deleted_at IS NULL AND \"date\" BETWEEN '{from}' AND '{to}' GROUP BY currency), \
         {ar}, {ap}, \
         rev AS (SELECT currency, SUM({signed}) AS revenue FROM {schema}.invoices \
                 WHERE deleted_at IS NULL AND status <> 'void' AND issue_date BETWEEN '{from}' AND '{to}' GROUP BY currency), \
         cost AS (SELECT currency, SUM({signed}) FILTER (WHERE category = 'cogs') AS cogs, \
                         SUM({signed}) FILTER (WHERE category = 'expense') AS expenses FROM {schema}.bills \
                  WHERE deleted_at IS NULL AND status <> 'void' AND issue_date BETWEEN '{from}' AND '{to}' GROUP BY currency), \
         docs AS (SELECT 'invoice' AS side, external_id, doc_number, customer_id AS cp, currency, total FROM {schema}.invoices \
                  WHERE deleted_at IS NULL AND status <> 'void' AND kind <> 'credit_note' \
                  UNION ALL SELECT 'bill', external_id, doc_number, vendor_id, currency, total FROM {schema}.bills \
                  WHERE deleted_at IS NULL AND status <> 'void' AND kind <> 'credit_note'), \
         med AS (SELECT side, cp, currency, percentile_cont(0.5) WITHIN GROUP (ORDER BY total) AS m, count(*) AS n \
                 FROM docs WHERE cp IS NOT NULL GROUP BY 1, 2, 3), \
         dev AS (SELECT d.side, d.cp, d.currency, d.total, med.m FROM docs d JOIN med USING (side, cp, currency) WHERE med.n >= 5), \
         mad AS (SELECT side, cp, currency, percentile_cont(0.5) WITHIN GROUP (ORDER BY abs(total - m)) AS mad FROM dev GROUP BY 1, 2, 3), \
         outl AS (SELECT dev.currency, count(*) AS c FROM dev JOIN mad USING (side, cp, currency) \
                  WHERE mad > 0 AND abs(0.6745 * (total - m) / mad) > 3.5 GROUP BY 1), \
         dupg AS (SELECT side, cp, doc_number FROM docs WHERE doc_number IS NOT NULL AND cp IS NOT NULL \
                  GROUP BY 1, 2, 3 HAVING count(DISTINCT external_id) > 1), \
         dup AS (SELECT d.currency, count(*) AS c FROM docs d JOIN dupg USING (side, cp, doc_number) GROUP BY 1), \
         applied AS (SELECT p.external_id, p.currency, p.amount, p.\"date\", d.total, d.side, d.external_id AS doc \
                     FROM {schema}.payments p JOIN docs d \
                       ON d.external_id = p.applied_to->>0 AND d.currency = p.currency \
                      AND d.side = CASE WHEN p.direction = 'in' THEN 'invoice' ELSE 'bill' END \
                     WHERE p.deleted_at IS NULL AND jsonb_array_length(p.applied_to) = 1), \
         over AS (SELECT currency, count(*) AS c FROM ( \
                    SELECT currency, amount, total - COALESCE(SUM(amount) OVER (PARTITION BY side, doc ORDER BY \"date\", external_id \
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS open_before FROM applied) x \
                  WHERE amount > open_before GROUP BY 1), \
         cur AS (SELECT currency FROM flow UNION SELECT currency FROM ar UNION SELECT currency FROM ap \
                 UNION SELECT currency FROM rev UNION SELECT currency FROM cost) \
         SELECT cur.currency, flow.inflow, flow.outflow, ar.cur, ar.d30, ar.d60, ar.d90, ar.d99, \
                ap.cur, ap.d30, ap.d60, ap.d90, ap.d99, rev.revenue, cost.cogs, cost.expenses, \
                COALESCE(outl.c, 0) + COALESCE(dup.c, 0) + COALESCE(over.c, 0) AS anomalies \
         FROM cur LEFT JOIN flow USING (currency) LEFT JOIN ar USING (currency) LEFT JOIN ap USING (currency) \
              LEFT JOIN rev USING (currency) LEFT JOIN cost USING (currency) LEFT JOIN outl USING (currency) \
              LEFT JOIN dup USING (currency) LEFT JOIN over USING (currency) ORDER BY 1",
        ar = buckets("invoices", "ar"),
        ap = buckets("bills", "ap"),
    )
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

/// The dashboard's aggregates read from the rollups and the saved anomaly counts, as one
/// hand-written query: what the dashboard itself reads, without sluice around it.
fn rollup_sql(schema: &str, as_of: &str, from: &str, to: &str, options: &str) -> String {
    let buckets = |side: &str, alias: &str| {
        format!(
            "{alias} AS (SELECT currency, \
               SUM(amount) FILTER (WHERE d <= 0) AS cur, SUM(amount) FILTER (WHERE d BETWEEN 1 AND 30) AS d30, \
               SUM(amount) FILTER (WHERE d BETWEEN 31 AND 60) AS d60, SUM(amount) FILTER (WHERE d BETWEEN 61 AND 90) AS d90, \
               SUM(amount) FILTER (WHERE d > 90) AS d99 \
             FROM (SELECT currency, amount, DATE '{as_of}' - due AS d FROM {schema}.fin_open WHERE side = '{side}') x \
             GROUP BY currency)"
        )
    };
    format!(
        "WITH \
         flow AS (SELECT currency, SUM(amount) FILTER (WHERE direction = 'in') AS inflow, \
                         SUM(amount) FILTER (WHERE direction = 'out') AS outflow \
                  FROM {schema}.fin_flow WHERE day BETWEEN '{from}' AND '{to}' GROUP BY currency), \
         {ar}, {ap}, \
         prof AS (SELECT currency, SUM(amount) FILTER (WHERE line = 'revenue') AS revenue, \
                         SUM(amount) FILTER (WHERE line = 'cogs') AS cogs, SUM(amount) FILTER (WHERE line = 'expense') AS expenses \
                  FROM {schema}.fin_profit WHERE day BETWEEN '{from}' AND '{to}' GROUP BY currency), \
         an AS (SELECT c.key AS currency, c.value::bigint AS n FROM {schema}.fin_anomaly_snapshots a \
                JOIN {schema}.fin_state s ON s.version = a.version, jsonb_each_text(a.counts) c WHERE a.options = '{options}'), \
         cur AS (SELECT currency FROM flow UNION SELECT currency FROM ar UNION SELECT currency FROM ap \
                 UNION SELECT currency FROM prof) \
         SELECT cur.currency, flow.inflow, flow.outflow, ar.cur, ar.d30, ar.d60, ar.d90, ar.d99, \
                ap.cur, ap.d30, ap.d60, ap.d90, ap.d99, prof.revenue, prof.cogs, prof.expenses, COALESCE(an.n, 0) \
         FROM cur LEFT JOIN flow USING (currency) LEFT JOIN ar USING (currency) LEFT JOIN ap USING (currency) \
              LEFT JOIN prof USING (currency) LEFT JOIN an USING (currency) ORDER BY 1",
        ar = buckets("invoice", "ar"),
        ap = buckets("bill", "ap"),
    )
}

/// Runs `sql` in psql `runs` times after one warm-up: the latencies psql reports, and the
/// sum of the last column of the last run's rows.
fn psql_runs(db: &str, sql: &str, runs: usize) -> (Vec<Duration>, u64) {
    let mut lat = Vec::new();
    let mut last = 0;
    for i in 0..=runs {
        let out = Command::new("psql")
            .arg(db)
            .args(["-X", "-q", "-A", "-t", "-c", "\\timing on", "-c", sql])
            .output()
            .expect("psql");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ms: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Time: "))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .expect("timing");
        if i > 0 {
            lat.push(Duration::from_secs_f64(ms / 1e3));
        }
        last = text
            .lines()
            .filter(|l| l.contains('|'))
            .map(|l| {
                l.rsplit('|')
                    .next()
                    .unwrap_or("0")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            })
            .sum::<u64>();
    }
    (lat, last)
}

async fn load(w: &PostgresWarehouse, tenant: &str, name: &str, entity: &str, path: &Path) -> f64 {
    let spec = PipelineSpec::from_toml(&format!(
        "name = \"{name}\"\ntenant = \"{tenant}\"\nentity = \"{entity}\"\n[source]\nkind = \"csv\"\npath = \"{}\"\n",
        path.display()
    ))
    .expect("spec");
    let t = Instant::now();
    let r = run_pipeline(
        &spec,
        &PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        w,
        &RunOptions::default(),
        &Quiet,
    )
    .await
    .expect("load");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  {tenant}: {entity} {} rows read, {} loaded in {secs:.1} s",
        r.ledger.counts.rows_read,
        r.ledger.counts.loaded(),
    );
    secs
}

#[tokio::main]
async fn main() {
    let admin_url = env_or(
        "SLUICE_BENCH_PG_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let rows: usize = env_or("SLUICE_BENCH_ROWS", "1000000").parse().expect("n");
    let runs: usize = env_or("SLUICE_BENCH_RUNS", "100").parse().expect("n");
    let slow_runs: usize = env_or("SLUICE_BENCH_SLOW_RUNS", "3").parse().expect("n");
    let name = format!("sluice_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url).await.expect("PostgreSQL");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create database");
    let db = format!("{}/{name}", admin_url.rsplit_once('/').expect("url").0);
    let w = PostgresWarehouse::connect(&db).await.expect("connect");
    let master = MasterKey::from_hex(MASTER).expect("key");
    let tenant = TenantSlug::parse("bench").expect("slug");
    w.create_tenant(&tenant, "Bench", &master)
        .await
        .expect("tenant");
    let mut conn = PgConnection::connect(&db).await.expect("c");
    let dir = tempfile::tempdir().expect("tmp");
    write_files(dir.path(), rows);
    let mut took = 0.0;
    for entity in ["invoices", "bills", "payments"] {
        let path = dir.path().join(format!("{entity}.csv"));
        took += load(&w, "bench", entity, entity, &path).await;
    }
    println!("load of {} rows: {took:.1} s", 3 * rows);
    sqlx::raw_sql("ANALYZE")
        .execute(&mut conn)
        .await
        .expect("analyze");
    let day = |m: u32, d: u32| NaiveDate::from_ymd_opt(2024, m, d).expect("date");
    let (as_of, from, to) = (day(9, 30), day(1, 1), day(6, 30));
    let options = AnomalyOptions::default();
    let dashboard = || sluice_finance::dashboard(&w, &tenant, as_of, from, to, options);

    let t = Instant::now();
    dashboard().await.expect("dashboard");
    println!(
        "first dashboard after the load (computes and saves the anomaly counts): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut lat = Vec::new();
    let mut anomalies = 0u64;
    for _ in 0..runs {
        let t = Instant::now();
        let d = dashboard().await.expect("dashboard");
        lat.push(t.elapsed());
        anomalies = d.currencies.values().map(|c| c.anomalies_count).sum();
    }
    let (p50, p99) = percentiles(lat);
    println!("dashboard ({runs} runs): p50 {p50:.1} ms, p99 {p99:.1} ms; {anomalies} anomalies");

    // A small batch of changed documents: the rollups follow in its transaction; the next
    // dashboard computes the anomaly counts again.
    let mut changed = String::from(
        "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at\n",
    );
    for i in 0..100 {
        writeln!(changed, "I{i},N{i},C1,Customer 1,2024-03-01,2024-03-31,USD,{}.00,{}.00,open,invoice,2024-06-01T00:00:00Z", 100 + i, 100 + i)
            .expect("w");
    }
    let path = dir.path().join("changed.csv");
    std::fs::write(&path, changed).expect("csv");
    load(&w, "bench", "invoices", "invoices", &path).await;
    let t = Instant::now();
    dashboard().await.expect("dashboard");
    println!(
        "first dashboard after 100 changed invoices: {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut lat = Vec::new();
    for _ in 0..slow_runs {
        let t = Instant::now();
        sluice_finance::anomalies_report(&w, &tenant, options)
            .await
            .expect("anomalies");
        lat.push(t.elapsed());
    }
    let (a50, a99) = percentiles(lat);
    println!("the full anomaly list ({slow_runs} runs): p50 {a50:.0} ms, max {a99:.0} ms");

    let (lat, n) = psql_runs(
        &db,
        &rollup_sql(
            "tenant_bench",
            &as_of.to_string(),
            &from.to_string(),
            &to.to_string(),
            &options.key(),
        ),
        runs,
    );
    let (r50, r99) = percentiles(lat);
    println!(
        "hand-written SQL over the same rollups in psql ({runs} runs): p50 {r50:.1} ms, p99 {r99:.1} ms; {n} anomalies"
    );
    println!(
        "  ratio dashboard/that SQL: p50 {:.2}, p99 {:.2}",
        p50 / r50,
        p99 / r99
    );
    let (lat, n) = psql_runs(
        &db,
        &hand_sql(
            "tenant_bench",
            &as_of.to_string(),
            &from.to_string(),
            &to.to_string(),
        ),
        slow_runs,
    );
    let (s50, s99) = percentiles(lat);
    println!(
        "hand-written SQL over the tables in psql ({slow_runs} runs): p50 {s50:.0} ms, max {s99:.0} ms; {n} anomalies"
    );
    println!(
        "  ratio dashboard/that SQL: p50 {:.4}, p99 {:.4}",
        p50 / s50,
        p99 / s99
    );

    drop(conn);
    drop(w);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop database");
}
