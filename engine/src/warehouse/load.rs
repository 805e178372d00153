//! The load contract: what a run needs from the store its rows land in, and nothing else.
//! `run_pipeline` and a quarantine replay are generic over [`LoadStore`]; the reads and
//! the admin's changes are separate traits ([`super::RunHistory`],
//! [`super::QuarantineStore`], [`super::FinanceStore`]).

use std::future::Future;

use arrow_array::RecordBatch;
use serde_json::Value;

use crate::entity::Entity;
use crate::error::{EngineError, ErrorKind, Result};
use crate::ledger::{RowCounts, RunLedger, RunStatus};
use crate::quarantine::QuarantineRecord;
use crate::tenant::TenantSlug;

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
    /// For a replay batch: the quarantined rows it settles, in the batch's transaction
    /// (see [`crate::warehouse::QuarantineStore::settle_replay`]), so rows are never loaded
    /// and still pending, nor replayed and not loaded.
    pub settles: Option<ReplaySettlement>,
}

/// The quarantined rows a replay batch settles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySettlement {
    /// Rows the batch loads: marked replayed by the run.
    pub replayed: Vec<String>,
    /// Rows that failed again: pending with their new errors, counted read and quarantined.
    pub failed: Vec<(String, Vec<crate::validate::CellError>)>,
}

impl LoadBatch {
    /// When the source deleted `row`, if it did.
    pub fn deleted_at(&self, row: usize) -> Option<i64> {
        self.deleted_at.get(row).copied().flatten()
    }
}

impl RunScope {
    /// The error of a commit that found the stream moved past `expected_version`: another
    /// run committed, and this one must stop without committing.
    pub fn fenced(&self, expected_version: i64) -> EngineError {
        EngineError::new(
            ErrorKind::Fenced,
            format!(
                "pipeline '{}' stream '{}' moved past version {expected_version}: another run committed; this run stops without committing",
                self.pipeline, self.stream
            ),
        )
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

/// Where a run's rows, quarantined rows, ledger and stream cursor are committed.
///
/// Contract every implementation keeps:
/// - [`LoadStore::commit_batch`] is atomic: the batch's rows, its quarantined rows, the
///   ledger's counts and the stream's new cursor commit together or not at all.
/// - The commit is fenced: it succeeds only if the stream's cursor version still equals
///   the version the caller read; otherwise it fails with [`ErrorKind::Fenced`] and changes
///   nothing. A run that lost ownership can never commit.
/// - Loads are idempotent under at-least-once delivery (a job may run twice): a repeated
///   batch finds its rows already present and counts them `unchanged`; an older
///   `updated_at` never overwrites a newer one.
/// - A tenant's calls touch only that tenant's store.
///
/// [`ErrorKind::Fenced`]: crate::ErrorKind::Fenced
pub trait LoadStore: Send + Sync {
    /// Creates the tenant's store if needed and brings its schema up to date.
    fn prepare_tenant(&self, tenant: &TenantSlug) -> impl Future<Output = Result<()>> + Send;

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
}
