//! Reading the run ledger back: one run, a tenant's recent runs, the tenants that have a
//! store.

use std::future::Future;

use crate::error::Result;
use crate::ledger::{JobLedger, RunLedger};
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

    /// The job that `run_id` (the job's id or one attempt's) belongs to, with every
    /// attempt recorded so far.
    fn job(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
    ) -> impl Future<Output = Result<Option<JobLedger>>> + Send {
        async move {
            let job = JobLedger::job_id(run_id);
            let Some(first) = self.run(tenant, job).await? else {
                return Ok(None);
            };
            let mut attempts = vec![first];
            // Attempts are numbered without gaps; no policy makes a hundred.
            for n in 2..=100 {
                match self.run(tenant, &format!("{job}.{n}")).await? {
                    Some(a) => attempts.push(a),
                    None => break,
                }
            }
            Ok(Some(JobLedger { attempts }))
        }
    }

    /// The tenant's runs, newest first, optionally of one pipeline.
    fn runs(
        &self,
        tenant: &TenantSlug,
        pipeline: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RunLedger>>> + Send;
}
