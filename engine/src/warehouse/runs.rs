//! Reading the run ledger back: one run, a tenant's recent runs, the tenants that have a
//! store.

use std::future::Future;

use crate::error::Result;
use crate::ledger::RunLedger;
use crate::tenant::TenantSlug;

/// The runs a warehouse has recorded.
pub trait RunHistory: Send + Sync {
    /// Tenants that have a store.
    fn tenants(&self) -> impl Future<Output = Result<Vec<TenantSlug>>> + Send;

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
}
