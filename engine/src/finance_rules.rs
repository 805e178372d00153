//! The finance rules, stated once: which documents count (live: not deleted at the source;
//! not void), how credit notes count (negative), and the aging buckets. The warehouses'
//! SQL is built from the fragments here, the PostgreSQL rollups (migration
//! `postgres/tenant/0005_finance_rollups.sql`) are checked against the same definitions by
//! `sluice finance check`, and the tests hold the SQL fragments to the Rust functions.
//! Every figure is per currency: two currencies are never added together.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Serialize;

/// Which side of the ledger an aging report covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgingSide {
    /// Accounts receivable: invoices.
    Receivable,
    /// Accounts payable: bills.
    Payable,
}

/// Aging buckets, by days past due on the as-of date.
pub const AGING_BUCKETS: [&str; 5] = ["current", "1_30", "31_60", "61_90", "over_90"];

/// The last day past due of each bucket but the open-ended last one: a document up to 0
/// days past due is `current`, up to 30 is `1_30`, and so on.
const AGING_BOUNDS: [(i64, &str); 4] = [(0, "current"), (30, "1_30"), (60, "31_60"), (90, "61_90")];

/// The bucket of a document due on `due` as of `as_of`: `current` when not yet past due
/// (due on or after the as-of date), then 1-30, 31-60, 61-90 and over 90 days past due.
pub fn aging_bucket(due: NaiveDate, as_of: NaiveDate) -> &'static str {
    let days = (as_of - due).num_days();
    AGING_BOUNDS
        .iter()
        .find(|(last, _)| days <= *last)
        .map_or(AGING_BUCKETS[4], |(_, bucket)| bucket)
}

/// [`aging_bucket`] as an SQL expression over `d`, the days past due.
pub fn aging_bucket_sql() -> String {
    let arms: String = AGING_BOUNDS
        .iter()
        .map(|(last, bucket)| format!("WHEN d <= {last} THEN '{bucket}' "))
        .collect();
    format!("CASE {arms}ELSE '{}' END", AGING_BUCKETS[4])
}

/// Whether a document counts in every aggregate: not deleted at the source and not void.
/// A document without a status does not count (as SQL's `status <> 'void'` on NULL).
pub fn is_live_document(deleted: bool, status: Option<&str>) -> bool {
    !deleted && status.is_some_and(|s| s != "void")
}

/// [`is_live_document`] as an SQL condition.
pub const LIVE_DOCUMENT_SQL: &str = "deleted_at IS NULL AND status <> 'void'";

/// A document's amount as it counts: credit notes negative.
pub fn signed_units(kind: Option<&str>, units: i128) -> i128 {
    if kind == Some("credit_note") {
        -units
    } else {
        units
    }
}

/// [`signed_units`] as an SQL expression over `amount`.
pub fn signed_sql(amount: &str) -> String {
    format!("CASE WHEN kind = 'credit_note' THEN -{amount} ELSE {amount} END")
}

/// The profitability line of a document: invoices are revenue; a bill's line is its
/// category (`cogs` or `expense`), none when it has no category.
pub fn profit_line(bill_category: Option<Option<&str>>) -> Option<&str> {
    match bill_category {
        None => Some("revenue"),
        Some(category) => category,
    }
}

/// The documents the anomaly checks read: live invoices and bills proper (credit notes are
/// left out), over `invoices` and `bills` tables and a total expression.
pub fn anomaly_documents_sql(invoices: &str, bills: &str, total: &str) -> String {
    let live = format!("{LIVE_DOCUMENT_SQL} AND kind <> 'credit_note'");
    format!(
        "SELECT 'invoice', external_id, doc_number, customer_id, currency, {total}, issue_date FROM {invoices} WHERE {live} \
         UNION ALL \
         SELECT 'bill', external_id, doc_number, vendor_id, currency, {total}, issue_date FROM {bills} WHERE {live}"
    )
}

/// Open balances of one currency by bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AgingBuckets {
    /// Not yet due.
    pub current: Decimal,
    /// 1 to 30 days past due.
    #[serde(rename = "1_30")]
    pub d1_30: Decimal,
    /// 31 to 60 days past due.
    #[serde(rename = "31_60")]
    pub d31_60: Decimal,
    /// 61 to 90 days past due.
    #[serde(rename = "61_90")]
    pub d61_90: Decimal,
    /// More than 90 days past due.
    pub over_90: Decimal,
}

impl AgingBuckets {
    /// All buckets at 0.00.
    pub fn zero() -> Self {
        let z = Decimal::new(0, 2);
        AgingBuckets {
            current: z,
            d1_30: z,
            d31_60: z,
            d61_90: z,
            over_90: z,
        }
    }

    /// Adds `amount` to the named bucket.
    pub fn add(&mut self, bucket: &str, amount: Decimal) {
        let slot = match bucket {
            "current" => &mut self.current,
            "1_30" => &mut self.d1_30,
            "31_60" => &mut self.d31_60,
            "61_90" => &mut self.d61_90,
            _ => &mut self.over_90,
        };
        *slot += amount;
    }

    /// The sum of all buckets.
    pub fn total(&self) -> Decimal {
        self.current + self.d1_30 + self.d31_60 + self.d61_90 + self.over_90
    }
}

/// An aging report: open balances per currency and bucket as of a date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AgingReport {
    /// The as-of date.
    pub as_of: NaiveDate,
    /// Currency -> buckets.
    pub currencies: BTreeMap<String, AgingBuckets>,
}

/// Payments of one currency and direction in one month, summed by the warehouse (the
/// pre-aggregation the cash-flow report starts from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowTotal {
    /// ISO 4217 code.
    pub currency: String,
    /// `in` or `out`.
    pub direction: String,
    /// `YYYY-MM`.
    pub month: String,
    /// Sum of the payments' amounts, in units of 1/10000.
    pub amount_units: i128,
    /// How many payments.
    pub payments: u64,
}

/// Documents of one currency, month (of issue) and profitability line, summed by the
/// warehouse: `revenue` (invoices), `cogs` and `expense` (bills by category); credit notes
/// count negative, void documents not at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfitTotal {
    /// ISO 4217 code.
    pub currency: String,
    /// `YYYY-MM` of the issue date.
    pub month: String,
    /// `revenue`, `cogs` or `expense`.
    pub line: String,
    /// Sum in units of 1/10000, credit notes subtracted.
    pub amount_units: i128,
}

/// Open balances of one currency, counterparty and aging bucket, summed by the warehouse
/// (credit notes negative; void, deleted and settled documents left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgingTotal {
    /// ISO 4217 code.
    pub currency: String,
    /// The customer (AR) or vendor (AP) id, if the documents have one.
    pub counterparty_id: Option<String>,
    /// A name the documents give it.
    pub counterparty_name: Option<String>,
    /// One of [`AGING_BUCKETS`].
    pub bucket: String,
    /// Sum in units of 1/10000.
    pub amount_units: i128,
}

/// A document as the anomaly checks need it (live, not void, invoices and bills proper:
/// credit notes are left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnomalyDocument {
    /// `invoice` or `bill`.
    pub side: String,
    /// The source's id.
    pub external_id: String,
    /// The printed number.
    pub doc_number: Option<String>,
    /// Customer or vendor id.
    pub counterparty_id: Option<String>,
    /// ISO 4217 code.
    pub currency: String,
    /// Total in units of 1/10000.
    pub total_units: i128,
    /// Issue date.
    pub issue_date: NaiveDate,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().expect("date")
    }

    #[test]
    fn aging_buckets_end_on_their_last_day_past_due() {
        let as_of = day("2026-03-31");
        for (due, bucket) in [
            ("2026-04-01", "current"),
            ("2026-03-31", "current"),
            ("2026-03-30", "1_30"),
            ("2026-03-01", "1_30"),
            ("2026-02-28", "31_60"),
            ("2026-01-30", "31_60"),
            ("2026-01-29", "61_90"),
            ("2025-12-31", "61_90"),
            ("2025-12-30", "over_90"),
        ] {
            assert_eq!(aging_bucket(day(due), as_of), bucket, "due {due}");
        }
    }

    /// The SQL fragments say what the Rust rules say, row by row (on SQLite in memory).
    #[tokio::test]
    async fn sql_fragments_agree_with_the_rules() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .connect("sqlite::memory:")
            .await
            .expect("sqlite");
        let cases: [(Option<&str>, Option<&str>, Option<&str>); 7] = [
            (None, Some("open"), Some("invoice")),
            (None, Some("paid"), Some("credit_note")),
            (None, Some("void"), Some("invoice")),
            (None, None, Some("invoice")),
            (Some("2024-01-01T00:00:00Z"), Some("open"), Some("invoice")),
            (None, Some("open"), None),
            (None, Some("draft"), Some("credit_note")),
        ];
        for (deleted_at, status, kind) in cases {
            let (live, signed): (Option<bool>, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {LIVE_DOCUMENT_SQL}, {} FROM (SELECT ? AS deleted_at, ? AS status, ? AS kind, 125 AS total)",
                signed_sql("total")
            )))
            .bind(deleted_at)
            .bind(status)
            .bind(kind)
            .fetch_one(&pool)
            .await
            .expect("query");
            assert_eq!(
                live.unwrap_or(false),
                is_live_document(deleted_at.is_some(), status),
                "{deleted_at:?} {status:?}"
            );
            assert_eq!(i128::from(signed), signed_units(kind, 125), "{kind:?}");
        }
        for (due, as_of) in [
            ("2026-04-01", "2026-03-31"),
            ("2026-03-01", "2026-03-31"),
            ("2026-01-30", "2026-03-31"),
            ("2025-12-31", "2026-03-31"),
            ("2025-12-30", "2026-03-31"),
        ] {
            let bucket: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT {} FROM (SELECT CAST(julianday(?) - julianday(?) AS INTEGER) AS d)",
                aging_bucket_sql()
            )))
            .bind(as_of)
            .bind(due)
            .fetch_one(&pool)
            .await
            .expect("bucket");
            assert_eq!(bucket, aging_bucket(day(due), day(as_of)), "due {due}");
        }
    }

    #[test]
    fn aging_bucket_sql_states_the_same_bounds() {
        assert_eq!(
            aging_bucket_sql(),
            "CASE WHEN d <= 0 THEN 'current' WHEN d <= 30 THEN '1_30' WHEN d <= 60 THEN '31_60' \
             WHEN d <= 90 THEN '61_90' ELSE 'over_90' END"
        );
    }
}
