//! Shared helpers for the integration tests: a generator of messy invoice files whose
//! expected outcome it computes on its own, and a warehouse that fails on a chosen batch.

#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod cli;
pub mod jobs;
pub mod mysql;
pub mod odoo;
pub mod pg;
pub mod private;
pub mod proxy;
pub mod qbo;
pub mod redis;

use std::collections::HashMap;
use std::fmt::Write as _;

/// Serves `app` on a free local port: its base URL and the server task (abort to stop).
pub async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, server)
}

use chrono::NaiveDate;
use rust_decimal::Decimal;
use sluice_engine::finance_rules::AgingReport;

/// A tiny deterministic PRNG (xorshift), so generated files are reproducible by seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Kinds of bad row the generator plants, each caught by exactly one rule.
pub const BAD_KINDS: [&str; 8] = [
    "missing_id",
    "bad_currency",
    "bad_date",
    "balance_over_total",
    "negative_total",
    "due_before_issue",
    "bad_amount",
    "ragged",
];

/// What a generated file must produce.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub rows_read: u64,
    pub loaded: u64,
    pub deduplicated: u64,
    pub quarantined: u64,
    pub bad_by_kind: HashMap<&'static str, u64>,
    /// external_id -> (currency, total units, balance units, due date, kind, status) of the winning version.
    pub winners: HashMap<String, Doc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub currency: &'static str,
    pub total_cents: i64,
    pub balance_cents: i64,
    pub due: NaiveDate,
    pub kind: &'static str,
    pub status: &'static str,
    pub version: u64,
}

impl Expected {
    pub fn sum_of_totals(&self) -> HashMap<&'static str, Decimal> {
        let mut out = HashMap::new();
        for d in self.winners.values() {
            *out.entry(d.currency).or_insert(Decimal::ZERO) += Decimal::new(d.total_cents, 2);
        }
        out
    }
}

fn cents(c: i64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

/// Writes `n` invoice records: mostly good, about 8% bad (spread over [`BAD_KINDS`]) and
/// about 10% repeats of an earlier id with a newer or older version. The header uses the
/// canonical names so no mapping is needed.
pub fn messy_invoices(n: usize, seed: u64) -> (String, Expected) {
    let mut rng = Rng::new(seed);
    let mut out = String::from(
        "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at\n",
    );
    let mut exp = Expected::default();
    let base = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
    let currencies = ["USD", "EUR", "GBP", "JPY"];
    let mut ids: Vec<String> = Vec::new();
    for i in 0..n {
        exp.rows_read += 1;
        let roll = rng.below(100);
        let issue = base + chrono::Duration::days(rng.below(180) as i64);
        let due = issue + chrono::Duration::days(30);
        let currency = currencies[rng.below(4) as usize];
        let total = 1000 + rng.below(500_000) as i64;
        let balance = if rng.below(3) == 0 {
            0
        } else {
            rng.below(total as u64 + 1) as i64
        };
        let kind = if rng.below(10) == 0 {
            "credit_note"
        } else {
            "invoice"
        };
        let version = 1000 + i as u64;
        let ts = |v: u64| {
            chrono::DateTime::from_timestamp(1_719_792_000 + v as i64, 0)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        };
        if roll < 8 {
            let bad = BAD_KINDS[roll as usize];
            *exp.bad_by_kind.entry(bad).or_default() += 1;
            exp.quarantined += 1;
            let id = format!("BAD-{i}");
            let (mut id_s, mut cur, mut issue_s, mut due_s, mut total_s, mut bal_s) = (
                id.clone(),
                currency.to_string(),
                issue.to_string(),
                due.to_string(),
                cents(total),
                cents(balance),
            );
            match bad {
                "missing_id" => id_s.clear(),
                "bad_currency" => cur = "XYZ".into(),
                "bad_date" => issue_s = "2024-02-30".into(),
                "balance_over_total" => bal_s = cents(total + 1),
                "negative_total" => {
                    total_s = format!("-{}", cents(total));
                    bal_s = "0.00".into();
                }
                "due_before_issue" => due_s = (issue - chrono::Duration::days(1)).to_string(),
                "bad_amount" => total_s = "12.3.4".into(),
                "ragged" => {
                    writeln!(
                        out,
                        "{id_s},{i},C{},Customer {},{issue_s},{due_s},{cur},{total_s}",
                        i % 97,
                        i % 97
                    )
                    .ok();
                    continue;
                }
                _ => unreachable!(),
            }
            writeln!(
                out,
                "{id_s},{i},C{},Customer {},{issue_s},{due_s},{cur},{total_s},{bal_s},,{kind},{}",
                i % 97,
                i % 97,
                ts(version)
            )
            .ok();
            continue;
        }
        // A repeat of an earlier good id, with a newer or an older version.
        let (id, version) = if roll < 18 && !ids.is_empty() {
            let id = ids[rng.below(ids.len() as u64) as usize].clone();
            let older = rng.below(2) == 0;
            let prev = exp.winners[&id].version;
            (id, if older { prev - 1 } else { version })
        } else {
            let id = format!("INV-{i:07}");
            ids.push(id.clone());
            (id, version)
        };
        let status = if balance > 0 { "open" } else { "paid" };
        let doc = Doc {
            currency,
            total_cents: total,
            balance_cents: balance,
            due,
            kind,
            status,
            version,
        };
        match exp.winners.get(&id) {
            Some(prev) => {
                exp.deduplicated += 1;
                if version >= prev.version {
                    exp.winners.insert(id.clone(), doc);
                }
            }
            None => {
                exp.winners.insert(id.clone(), doc);
            }
        }
        writeln!(
            out,
            "{id},{i},C{},Customer {},{issue},{due},{currency},{},{},,{kind},{}",
            i % 97,
            i % 97,
            cents(total),
            cents(balance),
            ts(version)
        )
        .ok();
    }
    exp.loaded = exp.winners.len() as u64;
    (out, exp)
}

/// Aging computed in plain Rust over the expected winners, the way the README defines it.
pub fn expected_aging(exp: &Expected, as_of: NaiveDate) -> HashMap<&'static str, [Decimal; 5]> {
    let mut out: HashMap<&'static str, [Decimal; 5]> = HashMap::new();
    for d in exp.winners.values() {
        if d.balance_cents <= 0 || d.status == "void" {
            continue;
        }
        let days = (as_of - d.due).num_days();
        let slot = match days {
            i64::MIN..=0 => 0,
            1..=30 => 1,
            31..=60 => 2,
            61..=90 => 3,
            _ => 4,
        };
        let sign = if d.kind == "credit_note" { -1 } else { 1 };
        out.entry(d.currency).or_insert([Decimal::ZERO; 5])[slot] +=
            Decimal::new(sign * d.balance_cents, 2);
    }
    out
}

/// The report as the same fixed-size arrays, for comparison.
pub fn report_buckets(report: &AgingReport) -> HashMap<String, [Decimal; 5]> {
    report
        .currencies
        .iter()
        .map(|(c, b)| {
            (
                c.clone(),
                [b.current, b.d1_30, b.d31_60, b.d61_90, b.over_90],
            )
        })
        .collect()
}

/// A server's confinement with uploads under `dir`: no files root, public hosts only.
/// Pipelines a test registers as the shell user ([`shell_change`]) are not confined.
#[allow(dead_code)]
pub fn confinement(dir: &std::path::Path) -> sluice_pipelines::Confinement {
    sluice_pipelines::Confinement::new(
        None,
        &dir.join("uploads"),
        sluice_connectors::egress::EgressPolicy::default(),
    )
    .expect("confinement")
}

/// A pipeline registered by the shell user, as `sluice trigger` does.
#[allow(dead_code)]
pub fn shell_change() -> sluice_engine::control::PipelineChange {
    sluice_engine::control::PipelineChange::shell_register(serde_json::json!({}))
}
