//! The warehouse: where loaded rows, quarantined rows, the run ledger and stream cursors
//! live, one isolated store per tenant.
//!
//! Contract every implementation keeps:
//! - `commit_batch` is atomic: the batch's rows, its quarantined rows, the ledger's counts
//!   and the stream's new cursor commit together or not at all.
//! - The commit is fenced: it succeeds only if the stream's cursor version still equals the
//!   version the caller read; otherwise it fails with [`ErrorKind::Fenced`] and changes
//!   nothing. A run that lost ownership can never commit.
//! - Loads are idempotent under at-least-once delivery: a repeated batch finds its rows
//!   already present and counts them `unchanged`; an older `updated_at` never overwrites a
//!   newer one.
//! - A tenant's calls touch only that tenant's store.
//!
//! [`ErrorKind::Fenced`]: crate::ErrorKind::Fenced

mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::future::Future;

use arrow_array::RecordBatch;
use chrono::NaiveDate;
use serde_json::Value;

pub use postgres::{FaultHook, FaultPoint, PostgresWarehouse, TenantInfo};
pub use sqlite::SqliteWarehouse;

use crate::dead_letter::DeadLetter;
use crate::entity::{Bill, Entity, Invoice, Payment};
use crate::error::Result;
use crate::finance::{AgingReport, AgingSide, AgingTotal, AnomalyDocument, FlowTotal, ProfitTotal};
use crate::ledger::{RowCounts, RunLedger, RunStatus};
use crate::quarantine::{QuarantineFilter, QuarantineRecord, QuarantineStats, QuarantinedRow};
use crate::tenant::TenantSlug;
use crate::validate::CellError;

/// An aging sum as the warehouses read it: currency, counterparty id and name, bucket, and
/// the sum (text or integer units, per warehouse).
type AgingRow<Sum> = (String, Option<String>, Option<String>, String, Sum);

/// An anomaly document as the warehouses read it: side, external id, doc number,
/// counterparty, currency, total (text or integer units), issue date.
type DocumentRow<Sum, Day> = (
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Sum,
    Day,
);

/// The aging bucket of `d`, the days past due (see [`crate::finance::aging_bucket`]).
const AGING_BUCKET_SQL: &str = "CASE WHEN d <= 0 THEN 'current' WHEN d <= 30 THEN '1_30' \
     WHEN d <= 60 THEN '31_60' WHEN d <= 90 THEN '61_90' ELSE 'over_90' END";

/// Saved anomaly counts as the warehouses store them (a JSON object, currency -> count).
fn encode_counts(counts: &BTreeMap<String, u64>) -> Result<String> {
    serde_json::to_string(counts).map_err(|e| {
        crate::EngineError::new(
            crate::ErrorKind::Warehouse,
            format!("encoding anomaly counts: {e}"),
        )
    })
}

/// Saved anomaly counts read back (see [`encode_counts`]).
fn decode_counts(text: Option<String>) -> Result<Option<BTreeMap<String, u64>>> {
    text.map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| {
            crate::EngineError::new(
                crate::ErrorKind::Warehouse,
                format!("saved anomaly counts are unreadable: {e}"),
            )
        })
}

/// The query body of [`Warehouse::anomaly_documents`] over `invoices` and `bills` tables
/// and a total expression.
fn anomaly_documents_sql(invoices: &str, bills: &str, total: &str) -> String {
    let live = "deleted_at IS NULL AND status <> 'void' AND kind <> 'credit_note'";
    format!(
        "SELECT 'invoice', external_id, doc_number, customer_id, currency, {total}, issue_date FROM {invoices} WHERE {live} \
         UNION ALL \
         SELECT 'bill', external_id, doc_number, vendor_id, currency, {total}, issue_date FROM {bills} WHERE {live}"
    )
}

/// Which run is committing, to which tenant, pipeline and stream.
#[derive(Debug, Clone)]
pub struct RunScope {
    /// The tenant whose warehouse is written.
    pub tenant: TenantSlug,
    /// The pipeline (the `source` column of every row it loads).
    pub pipeline: String,
    /// The source stream whose cursor advances.
    pub stream: String,
    /// The run.
    pub run_id: String,
    /// The rule-set hash stored with each quarantined row.
    pub rules_hash: String,
}

/// A stream's saved position and the version that fences commits.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamState {
    /// The cursor reached by the last committed batch, if any.
    pub cursor: Option<Value>,
    /// Incremented by every commit.
    pub version: i64,
}

/// One batch, validated and deduplicated, ready to commit.
#[derive(Debug, Clone)]
pub struct LoadBatch {
    /// What the rows are.
    pub entity: Entity,
    /// Canonical columns (`entity.schema()`).
    pub rows: RecordBatch,
    /// Indices into `rows` to load, one per `external_id`, in source order.
    pub load: Vec<u32>,
    /// Fingerprint of each row in `load`, same order.
    pub fingerprints: Vec<u128>,
    /// Rows rejected by mapping or validation.
    pub quarantine: Vec<QuarantineRecord>,
    /// Records the source produced for this batch.
    pub rows_read: u64,
    /// Valid rows superseded inside this batch.
    pub deduplicated: u64,
    /// The cursor reached at the end of the batch.
    pub cursor: Option<Value>,
    /// Per row of `rows`, when the source marks it deleted (UTC microseconds); empty when
    /// the pipeline has no soft-delete column.
    pub deleted_at: Vec<Option<i64>>,
    /// Records the source reports deleted, by `external_id`, with when (UTC microseconds):
    /// the warehouse's live copy is marked deleted (counted updated), or nothing happens
    /// when there is none (counted unchanged).
    pub tombstones: Vec<(String, i64)>,
}

impl LoadBatch {
    /// When the source deleted `row`, if it did.
    pub fn deleted_at(&self, row: usize) -> Option<i64> {
        self.deleted_at.get(row).copied().flatten()
    }
}

/// What a committed batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCommitted {
    /// Where the batch's rows went (also added to the run ledger).
    pub counts: RowCounts,
    /// The stream's cursor version after the commit.
    pub version: i64,
}

/// A tenant-isolated store for canonical rows, quarantine, runs and cursors.
pub trait Warehouse: Send + Sync {
    /// Creates the tenant's store if needed and brings its schema up to date.
    fn prepare_tenant(&self, tenant: &TenantSlug) -> impl Future<Output = Result<()>> + Send;

    /// Tenants that have a store.
    fn tenants(&self) -> impl Future<Output = Result<Vec<TenantSlug>>> + Send;

    /// The stream's saved cursor and version (version 0 and no cursor when new).
    fn stream_state(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        stream: &str,
    ) -> impl Future<Output = Result<StreamState>> + Send;

    /// Records a run as started.
    fn begin_run(&self, ledger: &RunLedger) -> impl Future<Output = Result<()>> + Send;

    /// Commits one batch atomically, fenced on `expected_version` (see the module contract).
    fn commit_batch(
        &self,
        scope: &RunScope,
        batch: &LoadBatch,
        expected_version: i64,
    ) -> impl Future<Output = Result<BatchCommitted>> + Send;

    /// Replaces the stream's cursor (fenced like a batch); returns the new version.
    fn set_cursor(
        &self,
        scope: &RunScope,
        cursor: Option<&Value>,
        expected_version: i64,
    ) -> impl Future<Output = Result<i64>> + Send;

    /// Records how a run ended and returns its ledger as stored.
    fn finish_run(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
        status: RunStatus,
        error: Option<&str>,
    ) -> impl Future<Output = Result<RunLedger>> + Send;

    /// One run's ledger.
    fn run(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
    ) -> impl Future<Output = Result<Option<RunLedger>>> + Send;

    /// The tenant's runs, newest first, optionally of one pipeline.
    fn runs(
        &self,
        tenant: &TenantSlug,
        pipeline: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RunLedger>>> + Send;

    /// Quarantined rows matching `filter`, oldest first.
    fn quarantined(
        &self,
        tenant: &TenantSlug,
        filter: &QuarantineFilter,
    ) -> impl Future<Output = Result<Vec<QuarantinedRow>>> + Send;

    /// Replaces a pending or fixed row's raw values (an admin's fix) and marks it fixed;
    /// returns the row as it was, or `None` when there is no such open row.
    fn fix_quarantined(
        &self,
        tenant: &TenantSlug,
        id: &str,
        raw: &serde_json::Map<String, Value>,
    ) -> impl Future<Output = Result<Option<QuarantinedRow>>> + Send;

    /// Sets a pending or fixed row aside with a reason; returns the row as it was, or
    /// `None` when there is no such open row.
    fn ignore_quarantined(
        &self,
        tenant: &TenantSlug,
        id: &str,
        reason: &str,
    ) -> impl Future<Output = Result<Option<QuarantinedRow>>> + Send;

    /// Counts by rule, field and status.
    fn quarantine_stats(
        &self,
        tenant: &TenantSlug,
    ) -> impl Future<Output = Result<QuarantineStats>> + Send;

    /// Live payments dated within `[from, to]`, summed per currency, direction and month.
    fn cash_flow_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> impl Future<Output = Result<Vec<FlowTotal>>> + Send;

    /// Live, non-void invoices and bills issued within `[from, to]`, summed per currency,
    /// month and profitability line (see [`ProfitTotal`]).
    fn profit_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> impl Future<Output = Result<Vec<ProfitTotal>>> + Send;

    /// Open balances as of `as_of` summed per currency, counterparty and aging bucket.
    fn aging_totals(
        &self,
        tenant: &TenantSlug,
        side: AgingSide,
        as_of: NaiveDate,
    ) -> impl Future<Output = Result<Vec<AgingTotal>>> + Send;

    /// Live, non-void invoices and bills (not credit notes), with only the columns the
    /// anomaly checks read.
    fn anomaly_documents(
        &self,
        tenant: &TenantSlug,
    ) -> impl Future<Output = Result<Vec<AnomalyDocument>>> + Send;

    /// The version of the tenant's finance data, and the anomaly counts per currency saved
    /// under `options` for exactly that version, if any. The version moves on in the same
    /// transaction as any change to an invoice, bill or payment; counts to be saved under
    /// it must be computed from data read after it was read.
    fn anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
    ) -> impl Future<Output = Result<(i64, Option<BTreeMap<String, u64>>)>> + Send;

    /// Saves anomaly counts per currency computed at data `version` under `options` (a
    /// snapshot of a newer version is kept; snapshots of older versions are dropped).
    fn save_anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
        version: i64,
        counts: &BTreeMap<String, u64>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Settles the quarantined rows of a replay run in one transaction: `replayed` rows
    /// (loaded by the run) are marked replayed by it; `failed` rows stay pending with their
    /// new errors and count in the run's ledger as read and quarantined. Rows no longer
    /// pending or fixed are left alone.
    fn settle_replay(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
        replayed: &[String],
        failed: &[(String, Vec<CellError>)],
    ) -> impl Future<Output = Result<()>> + Send;

    /// One quarantined row.
    fn quarantined_row(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<Option<QuarantinedRow>>> + Send;

    /// Open balances by currency and aging bucket (see [`crate::finance`]): the sums of
    /// [`Warehouse::aging_totals`] over counterparties.
    fn aging(
        &self,
        tenant: &TenantSlug,
        side: AgingSide,
        as_of: NaiveDate,
    ) -> impl Future<Output = Result<AgingReport>> + Send {
        async move {
            let mut report = AgingReport {
                as_of,
                currencies: Default::default(),
            };
            for t in self.aging_totals(tenant, side, as_of).await? {
                report
                    .currencies
                    .entry(t.currency)
                    .or_insert_with(crate::finance::AgingBuckets::zero)
                    .add(&t.bucket, crate::money::display_decimal(t.amount_units));
            }
            Ok(report)
        }
    }

    /// Every loaded invoice of the tenant, ordered by source and external id.
    fn invoices(&self, tenant: &TenantSlug) -> impl Future<Output = Result<Vec<Invoice>>> + Send;

    /// Every loaded bill of the tenant, ordered by source and external id.
    fn bills(&self, tenant: &TenantSlug) -> impl Future<Output = Result<Vec<Bill>>> + Send;

    /// Every loaded payment of the tenant, ordered by source and external id.
    fn payments(&self, tenant: &TenantSlug) -> impl Future<Output = Result<Vec<Payment>>> + Send;

    /// Records a dead job.
    fn record_dead_letter(&self, letter: &DeadLetter) -> impl Future<Output = Result<()>> + Send;

    /// The tenant's dead letters, newest first.
    fn dead_letters(
        &self,
        tenant: &TenantSlug,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;

    /// One dead letter.
    fn dead_letter(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<Option<DeadLetter>>> + Send;

    /// Marks a dead letter replayed by `run_id`; false when it was already replayed.
    fn mark_dead_letter_replayed(
        &self,
        tenant: &TenantSlug,
        id: &str,
        run_id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// Quotes an SQL identifier (every identifier sluice builds into SQL is also validated).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Columns a load writes, in order: the key, the entity's fields, then bookkeeping.
pub(crate) fn load_columns(entity: Entity) -> Vec<&'static str> {
    let mut cols = vec!["source"];
    cols.extend(entity.fields().iter().map(|f| f.name));
    cols.extend(["deleted_at", "loaded_at", "run_id", "row_hash"]);
    cols
}
