//! The quarantine desk: reading rows set aside, an admin's fix or ignore, and settling a
//! replay. A row's status only ever moves pending -> fixed -> replayed, or to ignored.

use std::future::Future;

use serde_json::Value;

use crate::error::Result;
use crate::quarantine::{QuarantineFilter, QuarantineStats, QuarantinedRow};
use crate::tenant::TenantSlug;
use crate::validate::CellError;

/// Where quarantined rows are read and changed.
pub trait QuarantineStore: Send + Sync {
    /// Quarantined rows matching `filter`, oldest first.
    fn quarantined(
        &self,
        tenant: &TenantSlug,
        filter: &QuarantineFilter,
    ) -> impl Future<Output = Result<Vec<QuarantinedRow>>> + Send;

    /// One quarantined row.
    fn quarantined_row(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<Option<QuarantinedRow>>> + Send;

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

    /// A run's quarantined errors per rule, counted in the database (a row with two
    /// errors of one rule counts twice).
    fn run_rule_counts(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
    ) -> impl Future<Output = Result<std::collections::BTreeMap<String, u64>>> + Send;

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
}
