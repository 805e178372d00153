//! Finance reports against an independent computation written here (plain Rust over the
//! generated rows), on the embedded warehouse and on PostgreSQL, which must agree exactly.

mod support;

use sluice_engine::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

use chrono::NaiveDate;
use rust_decimal::Decimal;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::{SqliteWarehouse, TenantSlug, Warehouse};
use sluice_pipelines::{PipelineSource, PipelineSpec, Quiet, RunOptions, run_pipeline};
use sqlx::Connection;
use support::Rng;
use support::pg::{MASTER_KEY_HEX, TestDb};

struct Pay {
    currency: &'static str,
    direction: &'static str,
    date: NaiveDate,
    cents: i64,
}

/// `n` payment records in three currencies over 2024, about 5% bad (quarantined, so never
/// counted); returns the CSV and the good payments.
fn payments(n: usize, seed: u64) -> (String, Vec<Pay>) {
    let mut rng = Rng::new(seed);
    let mut csv =
        String::from("external_id,direction,counterparty_id,date,amount,currency,applied_to\n");
    let mut good = Vec::new();
    let start = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
    for i in 0..n {
        let currency = ["USD", "EUR", "JPY"][rng.below(3) as usize];
        let direction = if rng.below(2) == 0 { "in" } else { "out" };
        let date = start + chrono::Duration::days(rng.below(366) as i64);
        let cents = 1 + rng.below(5_000_000) as i64;
        let bad = rng.below(20) == 0;
        let amount = if bad {
            format!("-{}.{:02}", cents / 100, cents % 100)
        } else {
            format!("{}.{:02}", cents / 100, cents % 100)
        };
        csv.push_str(&format!(
            "P{i},{direction},C-{},{date},{amount},{currency},\n",
            rng.below(50)
        ));
        if !bad {
            good.push(Pay {
                currency,
                direction,
                date,
                cents,
            });
        }
    }
    (csv, good)
}

/// Month -> (in, out).
type Months = BTreeMap<String, (Decimal, Decimal)>;

/// (currency -> (months, in, out)), computed directly.
fn expected(
    pays: &[Pay],
    from: NaiveDate,
    to: NaiveDate,
) -> BTreeMap<String, (Months, Decimal, Decimal)> {
    let mut out: BTreeMap<String, (Months, Decimal, Decimal)> = BTreeMap::new();
    for p in pays.iter().filter(|p| p.date >= from && p.date <= to) {
        let amount = Decimal::new(p.cents, 2);
        let entry = out.entry(p.currency.to_string()).or_default();
        let month = entry
            .0
            .entry(p.date.format("%Y-%m").to_string())
            .or_default();
        if p.direction == "in" {
            month.0 += amount;
            entry.1 += amount;
        } else {
            month.1 += amount;
            entry.2 += amount;
        }
    }
    out
}

fn spec(dir: &Path, csv: &str) -> PipelineSpec {
    std::fs::write(dir.join("payments.csv"), csv).expect("csv");
    let path = dir.join("payments.toml");
    std::fs::write(
        &path,
        "name = \"payments\"\ntenant = \"acme\"\nentity = \"payments\"\nbatch_rows = 2000\n[source]\nkind = \"csv\"\npath = \"payments.csv\"\n",
    )
    .expect("toml");
    PipelineSpec::from_file(&path).expect("spec")
}

async fn load<W: Warehouse>(w: &W, spec: &PipelineSpec) {
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    run_pipeline(spec, &source, w, &RunOptions::default(), &Quiet)
        .await
        .expect("sync");
}

fn check(report: &sluice_finance::CashFlowReport, pays: &[Pay]) {
    let want = expected(pays, report.from, report.to);
    assert_eq!(
        report.currencies.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (currency, (months, inflow, outflow)) in &want {
        let got = &report.currencies[currency];
        assert_eq!(got.total.inflow, *inflow, "{currency} inflow");
        assert_eq!(got.total.outflow, *outflow, "{currency} outflow");
        assert_eq!(got.total.net, *inflow - *outflow, "{currency} net");
        let got_months: Vec<(String, Decimal, Decimal)> = got
            .monthly
            .iter()
            .map(|m| (m.month.clone(), m.flow.inflow, m.flow.outflow))
            .collect();
        let want_months: Vec<(String, Decimal, Decimal)> = months
            .iter()
            .map(|(m, (i, o))| (m.clone(), *i, *o))
            .collect();
        assert_eq!(got_months, want_months, "{currency} months");
    }
}

#[tokio::test]
async fn cash_flow_matches_an_independent_computation_on_both_warehouses() {
    let dir = tempfile::tempdir().expect("tmp");
    let (csv, pays) = payments(20_000, 5);
    let spec = spec(dir.path(), &csv);
    let tenant = TenantSlug::parse("acme").expect("slug");

    let sqlite = SqliteWarehouse::new(dir.path().join("data"));
    load(&sqlite, &spec).await;
    let db = TestDb::create().await;
    let master = sluice_engine::secrets::MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    let pg = PostgresWarehouse::connect(&db.url).await.expect("connect");
    pg.create_tenant(&tenant, "Acme", &master)
        .await
        .expect("tenant");
    load(&pg, &spec).await;

    let day = |m: u32, d: u32| NaiveDate::from_ymd_opt(2024, m, d).expect("date");
    // The whole year, a period cut mid-month on both ends (boundary days included), one day,
    // and a period with no payments.
    for (from, to) in [
        (day(1, 1), day(12, 31)),
        (day(2, 15), day(11, 10)),
        (day(6, 30), day(6, 30)),
        (
            NaiveDate::from_ymd_opt(2030, 1, 1).expect("date"),
            NaiveDate::from_ymd_opt(2030, 12, 31).expect("date"),
        ),
    ] {
        let a = sluice_finance::cash_flow_report(&sqlite, &tenant, from, to)
            .await
            .expect("sqlite report");
        let b = sluice_finance::cash_flow_report(&pg, &tenant, from, to)
            .await
            .expect("postgres report");
        check(&a, &pays);
        assert_eq!(a, b, "SQLite and PostgreSQL disagree for {from}..{to}");
    }
    let err = sluice_finance::cash_flow_report(&sqlite, &tenant, day(5, 1), day(4, 1)).await;
    assert!(err.is_err(), "a reversed period is refused");

    // The CLI prints the same report.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "finance",
            "cash-flow",
            "--tenant",
            "acme",
            "--from",
            "2024-02-15",
        ])
        .args(["--to", "2024-11-10", "--json"])
        .env_remove("SLUICE_DATABASE_URL")
        .output()
        .expect("run sluice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let report = sluice_finance::cash_flow_report(&sqlite, &tenant, day(2, 15), day(11, 10))
        .await
        .expect("report");
    assert_eq!(printed, serde_json::to_value(&report).expect("json"));
    assert!(
        printed["currencies"]["USD"]["inflow"].is_string(),
        "amounts are decimal strings"
    );
}

struct Doc {
    currency: &'static str,
    issue: NaiveDate,
    cents: i64,
    credit: bool,
    void: bool,
    /// `revenue` for invoices; `cogs` or `expense` for bills.
    line: &'static str,
}

/// `n` invoices and `n` bills over 2024 in three currencies, with credit notes, void and
/// paid documents and about 5% bad rows (quarantined, never counted).
fn documents(n: usize, seed: u64) -> (String, String, Vec<Doc>) {
    let mut rng = Rng::new(seed);
    let mut inv = String::from(
        "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at\n",
    );
    let mut bills = String::from(
        "external_id,doc_number,vendor_id,vendor_name,issue_date,due_date,currency,total,balance,status,kind,category,updated_at\n",
    );
    let mut good = Vec::new();
    let start = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
    for side in ["invoice", "bill"] {
        for i in 0..n {
            let currency = ["USD", "EUR", "GBP"][rng.below(3) as usize];
            let issue = start + chrono::Duration::days(rng.below(366) as i64);
            let due = issue + chrono::Duration::days(30);
            let cents = 1 + rng.below(2_000_000) as i64;
            let credit = rng.below(10) == 0;
            let status = ["open", "paid", "void", "draft"][rng.below(4) as usize];
            let bad = rng.below(20) == 0;
            let total = if bad {
                format!("-{}.{:02}", cents / 100, cents % 100)
            } else {
                format!("{}.{:02}", cents / 100, cents % 100)
            };
            let balance = if status == "paid" {
                "0.00".to_string()
            } else {
                total.trim_start_matches('-').to_string()
            };
            let kind = if credit { "credit_note" } else { side };
            let line = if side == "invoice" {
                "revenue"
            } else if rng.below(2) == 0 {
                "cogs"
            } else {
                "expense"
            };
            if side == "invoice" {
                inv.push_str(&format!(
                    "I{i},{i},C-1,Customer,{issue},{due},{currency},{total},{balance},{status},{kind},2024-01-01T00:00:00Z\n"
                ));
            } else {
                bills.push_str(&format!(
                    "B{i},{i},V-1,Vendor,{issue},{due},{currency},{total},{balance},{status},{kind},{line},2024-01-01T00:00:00Z\n"
                ));
            }
            if !bad {
                good.push(Doc {
                    currency,
                    issue,
                    cents,
                    credit,
                    void: status == "void",
                    line,
                });
            }
        }
    }
    (inv, bills, good)
}

fn pipeline(dir: &Path, name: &str, entity: &str, csv: &str) -> PipelineSpec {
    std::fs::write(dir.join(format!("{name}.csv")), csv).expect("csv");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("name = \"{name}\"\ntenant = \"acme\"\nentity = \"{entity}\"\nbatch_rows = 2000\n[source]\nkind = \"csv\"\npath = \"{name}.csv\"\n"),
    )
    .expect("toml");
    PipelineSpec::from_file(&path).expect("spec")
}

/// Per currency and month (and "total"): revenue, cogs, expenses, computed directly.
fn expected_profit(
    docs: &[Doc],
    from: NaiveDate,
    to: NaiveDate,
) -> BTreeMap<(String, String), [Decimal; 3]> {
    let mut out: BTreeMap<(String, String), [Decimal; 3]> = BTreeMap::new();
    for d in docs
        .iter()
        .filter(|d| !d.void && d.issue >= from && d.issue <= to)
    {
        let amount = Decimal::new(if d.credit { -d.cents } else { d.cents }, 2);
        let i = match d.line {
            "revenue" => 0,
            "cogs" => 1,
            _ => 2,
        };
        for month in [d.issue.format("%Y-%m").to_string(), "total".to_string()] {
            out.entry((d.currency.to_string(), month)).or_default()[i] += amount;
        }
    }
    out
}

fn check_profit(report: &sluice_finance::ProfitabilityReport, docs: &[Doc]) {
    let want = expected_profit(docs, report.from, report.to);
    let mut got = BTreeMap::new();
    for (currency, p) in &report.currencies {
        for m in &p.monthly {
            got.insert((currency.clone(), m.month.clone()), m.profit);
        }
        got.insert((currency.clone(), "total".to_string()), p.total);
    }
    assert_eq!(got.len(), want.len());
    for (key, [revenue, cogs, expenses]) in &want {
        let p = got.get(key).unwrap_or_else(|| panic!("missing {key:?}"));
        assert_eq!(
            (p.revenue, p.cogs, p.expenses),
            (*revenue, *cogs, *expenses),
            "{key:?}"
        );
        let gross = *revenue - *cogs;
        assert_eq!(p.gross_profit, gross, "{key:?}");
        assert_eq!(p.net_profit, gross - *expenses, "{key:?}");
        let margin = (!revenue.is_zero()).then(|| (gross / *revenue).round_dp(4));
        assert_eq!(p.gross_margin, margin, "{key:?}");
    }
}

#[tokio::test]
async fn profitability_matches_an_independent_computation_on_both_warehouses() {
    let dir = tempfile::tempdir().expect("tmp");
    let (inv, bills, docs) = documents(8_000, 9);
    let specs = [
        pipeline(dir.path(), "invoices", "invoices", &inv),
        pipeline(dir.path(), "bills", "bills", &bills),
    ];
    let tenant = TenantSlug::parse("acme").expect("slug");
    let sqlite = SqliteWarehouse::new(dir.path().join("data"));
    let db = TestDb::create().await;
    let master = sluice_engine::secrets::MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    let pg = PostgresWarehouse::connect(&db.url).await.expect("connect");
    pg.create_tenant(&tenant, "Acme", &master)
        .await
        .expect("tenant");
    for spec in &specs {
        load(&sqlite, spec).await;
        load(&pg, spec).await;
    }
    let day = |m: u32, d: u32| NaiveDate::from_ymd_opt(2024, m, d).expect("date");
    for (from, to) in [
        (day(1, 1), day(12, 31)),
        (day(3, 31), day(9, 1)),
        (day(7, 4), day(7, 4)),
    ] {
        let a = sluice_finance::profitability_report(&sqlite, &tenant, from, to)
            .await
            .expect("sqlite report");
        let b = sluice_finance::profitability_report(&pg, &tenant, from, to)
            .await
            .expect("postgres report");
        check_profit(&a, &docs);
        assert_eq!(a, b, "SQLite and PostgreSQL disagree for {from}..{to}");
    }
}

#[tokio::test]
async fn aging_per_counterparty_adds_up_to_the_currency_buckets_on_both_warehouses() {
    use sluice_engine::finance_rules::AgingSide;
    let dir = tempfile::tempdir().expect("tmp");
    let (csv, _) = support::messy_invoices(6_000, 3);
    let spec = pipeline(dir.path(), "invoices", "invoices", &csv);
    let tenant = TenantSlug::parse("acme").expect("slug");
    let sqlite = SqliteWarehouse::new(dir.path().join("data"));
    let db = TestDb::create().await;
    let master = sluice_engine::secrets::MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    let pg = PostgresWarehouse::connect(&db.url).await.expect("connect");
    pg.create_tenant(&tenant, "Acme", &master)
        .await
        .expect("tenant");
    load(&sqlite, &spec).await;
    load(&pg, &spec).await;
    for as_of in ["2024-03-31", "2024-06-30", "2025-01-15"] {
        let as_of: NaiveDate = as_of.parse().expect("date");
        let a = sluice_finance::aging_report(&sqlite, &tenant, AgingSide::Receivable, as_of)
            .await
            .expect("sqlite");
        let b = sluice_finance::aging_report(&pg, &tenant, AgingSide::Receivable, as_of)
            .await
            .expect("postgres");
        assert_eq!(a, b, "SQLite and PostgreSQL disagree as of {as_of}");
        // The currency buckets equal the aging report tested against the generator's own
        // computation (tests/sync.rs), and the counterparties add up to them.
        let plain = sqlite
            .aging(&tenant, AgingSide::Receivable, as_of)
            .await
            .expect("aging");
        assert_eq!(a.currencies.len(), plain.currencies.len());
        for (currency, buckets) in &plain.currencies {
            let got = &a.currencies[currency];
            assert_eq!(&got.buckets, buckets, "{currency}");
            assert_eq!(got.total, buckets.total());
            let mut sum = sluice_engine::finance_rules::AgingBuckets::zero();
            for c in &got.counterparties {
                for (name, v) in serde_json::to_value(&c.buckets)
                    .expect("json")
                    .as_object()
                    .expect("obj")
                {
                    sum.add(name, v.as_str().expect("decimal").parse().expect("decimal"));
                }
                assert_eq!(c.total, c.buckets.total());
            }
            assert_eq!(&sum, buckets, "{currency}: counterparties add up");
            assert!(
                got.counterparties.len() > 1,
                "{currency}: per customer rows"
            );
        }
    }
}

#[tokio::test]
async fn planted_anomalies_are_found_on_both_warehouses_and_the_dashboard_agrees() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut inv = String::from(
        "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at\n",
    );
    for i in 0..12 {
        inv.push_str(&format!(
            "I{i},N{i},C1,Contoso,2024-03-{:02},2024-04-{:02},USD,{}.00,{}.00,open,invoice,2024-03-01T00:00:00Z\n",
            i + 1,
            i + 1,
            100 + i,
            100 + i
        ));
    }
    inv.push_str("BIG,N50,C1,Contoso,2024-03-20,2024-04-20,USD,25000.00,25000.00,open,invoice,2024-03-01T00:00:00Z\n");
    inv.push_str("DUP,N3,C1,Contoso,2024-03-21,2024-04-21,USD,103.00,103.00,open,invoice,2024-03-01T00:00:00Z\n");
    inv.push_str(
        "E1,N1,C9,Other,2024-03-21,2024-04-21,EUR,80.00,80.00,open,invoice,2024-03-01T00:00:00Z\n",
    );
    let pays = "external_id,direction,counterparty_id,date,amount,currency,applied_to\n\
                P1,in,C1,2024-04-01,60.00,USD,I0\n\
                P2,in,C1,2024-04-02,60.00,USD,I0\n\
                P3,in,C1,2024-04-03,101.00,USD,I1\n\
                P4,in,C9,2024-04-03,90.00,EUR,E1\n";
    let specs = [
        pipeline(dir.path(), "invoices", "invoices", &inv),
        pipeline(dir.path(), "payments", "payments", pays),
    ];
    let tenant = TenantSlug::parse("acme").expect("slug");
    let sqlite = SqliteWarehouse::new(dir.path().join("data"));
    let db = TestDb::create().await;
    let master = sluice_engine::secrets::MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    let pg = PostgresWarehouse::connect(&db.url).await.expect("connect");
    pg.create_tenant(&tenant, "Acme", &master)
        .await
        .expect("tenant");
    for spec in &specs {
        load(&sqlite, spec).await;
        load(&pg, spec).await;
    }
    let options = sluice_finance::AnomalyOptions::default();
    let a = sluice_finance::anomalies_report(&sqlite, &tenant, options)
        .await
        .expect("sqlite");
    let b = sluice_finance::anomalies_report(&pg, &tenant, options)
        .await
        .expect("postgres");
    assert_eq!(a, b, "SQLite and PostgreSQL disagree");
    let found: Vec<(&str, &str)> = a
        .iter()
        .map(|x| (x.kind.as_str(), x.document.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("amount_outlier", "BIG"),
            ("duplicate_doc_number", "DUP"),
            ("duplicate_doc_number", "I3"),
            ("overpayment", "P2"),
            ("overpayment", "P4"),
        ]
    );
    // A stricter history requirement silences the outlier (13 invoices < 20).
    let strict = sluice_finance::AnomalyOptions {
        min_history: 20,
        ..options
    };
    let fewer = sluice_finance::anomalies_report(&sqlite, &tenant, strict)
        .await
        .expect("report");
    assert!(fewer.iter().all(|x| x.kind != "amount_outlier"));

    let day = |m: u32, d: u32| NaiveDate::from_ymd_opt(2024, m, d).expect("date");
    let (as_of, from, to) = (day(5, 15), day(1, 1), day(12, 31));
    let dash = sluice_finance::dashboard(&sqlite, &tenant, as_of, from, to, options)
        .await
        .expect("dashboard");
    let dash_pg = sluice_finance::dashboard(&pg, &tenant, as_of, from, to, options)
        .await
        .expect("dashboard");
    assert_eq!(dash, dash_pg);
    let usd = &dash.currencies["USD"];
    assert_eq!(usd.anomalies_count, 4);
    assert_eq!(dash.currencies["EUR"].anomalies_count, 1);
    let flow = sluice_finance::cash_flow_report(&sqlite, &tenant, from, to)
        .await
        .expect("flow");
    assert_eq!(usd.cash_flow, flow.currencies["USD"].total);
    assert_eq!(usd.cash_flow.inflow, Decimal::new(22_100, 2));
    let ar = sluice_finance::aging_report(
        &sqlite,
        &tenant,
        sluice_engine::finance_rules::AgingSide::Receivable,
        as_of,
    )
    .await
    .expect("ar");
    assert_eq!(usd.ar_aging, ar.currencies["USD"].buckets);
    let profit = sluice_finance::profitability_report(&sqlite, &tenant, from, to)
        .await
        .expect("profit");
    assert_eq!(usd.profitability, profit.currencies["USD"].total);
    let json = serde_json::to_value(&dash).expect("json");
    for key in [
        "cash_flow",
        "ar_aging",
        "ap_aging",
        "profitability",
        "anomalies_count",
    ] {
        assert!(json["currencies"]["USD"].get(key).is_some(), "{key}");
    }
    assert_eq!(
        json["currencies"]["USD"]["ar_aging"]["1_30"]
            .as_str()
            .map(|s| !s.is_empty()),
        Some(true)
    );

    // The counts are saved for the data's version: a batch that adds an anomaly counts at
    // once (here a second pipeline's invoice reusing N5: two more duplicates).
    let more = pipeline(
        dir.path(),
        "more_invoices",
        "invoices",
        "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at\n\
         DUP2,N5,C1,Contoso,2024-03-22,2024-04-22,USD,104.00,104.00,open,invoice,2024-03-01T00:00:00Z\n",
    );
    let key = options.key();
    assert!(
        sqlite
            .anomaly_counts(&tenant, &key)
            .await
            .expect("saved")
            .1
            .is_some()
    );
    assert!(
        pg.anomaly_counts(&tenant, &key)
            .await
            .expect("saved")
            .1
            .is_some()
    );
    load(&sqlite, &more).await;
    load(&pg, &more).await;
    let dash = sluice_finance::dashboard(&sqlite, &tenant, as_of, from, to, options)
        .await
        .expect("dashboard");
    assert_eq!(dash.currencies["USD"].anomalies_count, 6);
    let dash_pg = sluice_finance::dashboard(&pg, &tenant, as_of, from, to, options)
        .await
        .expect("dashboard");
    assert_eq!(dash, dash_pg);
}

/// Every dashboard figure (and the per-month series behind it) of both warehouses, over a
/// few periods and as-of dates; they must agree exactly.
async fn assert_same_figures(
    sqlite: &SqliteWarehouse,
    pg: &PostgresWarehouse,
    tenant: &TenantSlug,
) {
    use sluice_engine::finance_rules::AgingSide;
    let day = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d).expect("date");
    let options = sluice_finance::AnomalyOptions::default();
    for (as_of, from, to) in [
        (day(2024, 3, 31), day(2024, 1, 1), day(2024, 12, 31)),
        (day(2024, 8, 15), day(2024, 2, 29), day(2024, 7, 1)),
        (day(2025, 2, 1), day(2024, 10, 10), day(2024, 10, 10)),
    ] {
        let a = sluice_finance::dashboard(sqlite, tenant, as_of, from, to, options)
            .await
            .expect("sqlite dashboard");
        let b = sluice_finance::dashboard(pg, tenant, as_of, from, to, options)
            .await
            .expect("postgres dashboard");
        assert_eq!(a, b, "dashboards disagree for {as_of} {from}..{to}");
        for side in [AgingSide::Receivable, AgingSide::Payable] {
            let a = sluice_finance::aging_report(sqlite, tenant, side, as_of)
                .await
                .expect("aging");
            let b = sluice_finance::aging_report(pg, tenant, side, as_of)
                .await
                .expect("aging");
            assert_eq!(a, b, "{side:?} aging disagrees as of {as_of}");
        }
        let a = sluice_finance::profitability_report(sqlite, tenant, from, to)
            .await
            .expect("profit");
        let b = sluice_finance::profitability_report(pg, tenant, from, to)
            .await
            .expect("profit");
        assert_eq!(a, b, "profitability disagrees for {from}..{to}");
        let a = sluice_finance::cash_flow_report(sqlite, tenant, from, to)
            .await
            .expect("flow");
        let b = sluice_finance::cash_flow_report(pg, tenant, from, to)
            .await
            .expect("flow");
        assert_eq!(a, b, "cash flow disagrees for {from}..{to}");
    }
}

/// PostgreSQL answers the dashboard from rollups its triggers keep in each batch's
/// transaction; the embedded warehouse sums its tables. Through inserts, updates (new
/// amounts, statuses, currencies, dates), unchanged re-reads, deletions and a corrupted
/// rollup, both must give the same figures and the rollups must equal the tables' sums.
#[tokio::test]
async fn postgres_rollups_follow_every_change_and_agree_with_the_tables() {
    let dir = tempfile::tempdir().expect("tmp");
    let tenant = TenantSlug::parse("acme").expect("slug");
    let sqlite = SqliteWarehouse::new(dir.path().join("data"));
    let db = TestDb::create().await;
    let master = sluice_engine::secrets::MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    let pg = PostgresWarehouse::connect(&db.url).await.expect("connect");
    pg.create_tenant(&tenant, "Acme", &master)
        .await
        .expect("tenant");
    let round = |docs: usize, seed: u64| {
        let (inv, bills, _) = documents(docs, seed);
        let (pays, _) = payments(docs, seed + 1);
        [
            pipeline(dir.path(), "invoices", "invoices", &inv),
            pipeline(dir.path(), "bills", "bills", &bills),
            pipeline(dir.path(), "payments", "payments", &pays),
        ]
    };
    for spec in &round(3_000, 21) {
        load(&sqlite, spec).await;
        load(&pg, spec).await;
    }
    assert_eq!(
        pg.check_finance_rollups(&tenant).await.expect("check"),
        Vec::<String>::new()
    );
    assert_same_figures(&sqlite, &pg, &tenant).await;
    let day = |m: u32, d: u32| NaiveDate::from_ymd_opt(2024, m, d).expect("date");
    let options = sluice_finance::AnomalyOptions::default();
    let first =
        sluice_finance::dashboard(&pg, &tenant, day(6, 30), day(1, 1), day(12, 31), options)
            .await
            .expect("dashboard");

    // The same ids with new contents, and 1,000 new ones of each.
    for spec in &round(4_000, 23) {
        load(&sqlite, spec).await;
        load(&pg, spec).await;
    }
    assert_eq!(
        pg.check_finance_rollups(&tenant).await.expect("check"),
        Vec::<String>::new()
    );
    assert_same_figures(&sqlite, &pg, &tenant).await;
    let second =
        sluice_finance::dashboard(&pg, &tenant, day(6, 30), day(1, 1), day(12, 31), options)
            .await
            .expect("dashboard");
    assert_ne!(first, second, "the second round changed the figures");

    // Reading the same files again changes no row: the data version stays, and with it the
    // saved anomaly counts.
    let key = options.key();
    let (version, saved) = pg.anomaly_counts(&tenant, &key).await.expect("counts");
    assert!(saved.is_some(), "the dashboard saved its anomaly counts");
    for spec in &round(4_000, 23) {
        load(&pg, spec).await;
    }
    assert_eq!(
        pg.anomaly_counts(&tenant, &key).await.expect("counts"),
        (version, saved)
    );

    // Any write path keeps them: rows deleted, marked deleted and voided in plain SQL.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    for sql in [
        "DELETE FROM tenant_acme.invoices WHERE external_id LIKE 'I1%'",
        "UPDATE tenant_acme.bills SET deleted_at = now(), row_hash = '\\x00' WHERE external_id LIKE 'B2%'",
        "UPDATE tenant_acme.invoices SET status = 'void', row_hash = '\\x00' WHERE external_id LIKE 'I3%'",
        "UPDATE tenant_acme.payments SET amount = amount + 0.0001, row_hash = '\\x00' WHERE external_id LIKE 'P4%'",
    ] {
        sqlx::raw_sql(sql).execute(&mut conn).await.expect("change");
    }
    assert_eq!(
        pg.check_finance_rollups(&tenant).await.expect("check"),
        Vec::<String>::new()
    );
    let (moved, stale) = pg.anomaly_counts(&tenant, &key).await.expect("counts");
    assert!(
        moved > version && stale.is_none(),
        "changes move the data version on"
    );

    // A rollup changed behind the triggers' back is found, and rebuilt from the tables.
    sqlx::raw_sql(
        "UPDATE tenant_acme.fin_flow SET amount = amount + 1 \
         WHERE (currency, direction, day) = (SELECT currency, direction, day FROM tenant_acme.fin_flow ORDER BY 1, 2, 3 LIMIT 1)",
    )
    .execute(&mut conn)
    .await
    .expect("corrupt");
    let drift = pg.check_finance_rollups(&tenant).await.expect("check");
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(drift[0].starts_with("fin_flow "), "{drift:?}");
    // The CLI reports it (exit 1), and --repair rebuilds the rollups from the tables.
    let url = db.url.clone();
    let cli = move |repair: bool| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
            cmd.args([
                "--database-url",
                &url,
                "finance",
                "check",
                "--tenant",
                "acme",
            ]);
            if repair {
                cmd.arg("--repair");
            }
            cmd.output().expect("run sluice")
        })
    };
    let out = cli(false).await.expect("join");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(printed.contains(&drift[0]), "{printed}");
    let out = cli(true).await.expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        pg.check_finance_rollups(&tenant).await.expect("check"),
        Vec::<String>::new()
    );
    let out = cli(false).await.expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Batches of one tenant's documents committing at the same time (three pipelines) keep the
/// rollups exact: the triggers serialise on the tenant's finance lock.
#[tokio::test]
async fn concurrent_loads_keep_the_postgres_rollups_exact() {
    let dir = tempfile::tempdir().expect("tmp");
    let tenant = TenantSlug::parse("acme").expect("slug");
    let (inv, bills, _) = documents(6_000, 41);
    let (inv2, _, _) = documents(6_000, 42);
    // The second invoice file under other ids: another pipeline's rows.
    let inv2 = inv2.replace("\nI", "\nJ");
    let specs = [
        pipeline(dir.path(), "invoices", "invoices", &inv),
        pipeline(dir.path(), "invoices_b", "invoices", &inv2),
        pipeline(dir.path(), "bills", "bills", &bills),
    ];
    let sqlite = SqliteWarehouse::new(dir.path().join("data"));
    let db = TestDb::create().await;
    let master = sluice_engine::secrets::MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    let pg = PostgresWarehouse::connect(&db.url).await.expect("connect");
    pg.create_tenant(&tenant, "Acme", &master)
        .await
        .expect("tenant");
    for spec in &specs {
        load(&sqlite, spec).await;
    }
    tokio::join!(
        load(&pg, &specs[0]),
        load(&pg, &specs[1]),
        load(&pg, &specs[2])
    );
    assert_eq!(
        pg.check_finance_rollups(&tenant).await.expect("check"),
        Vec::<String>::new()
    );
    assert_same_figures(&sqlite, &pg, &tenant).await;
}
