//! Dead letters: jobs that failed permanently or exhausted their retries, kept with every
//! attempt's error and time until an admin replays them.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;
use crate::tenant::TenantSlug;

/// One dead job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Stable id.
    pub id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The pipeline the job ran.
    pub pipeline: String,
    /// `sync` or `replay`.
    pub job_kind: String,
    /// The job as queued, to replay it.
    pub job: Value,
    /// Every attempt: `[{number, at, error, transient}, ...]`.
    pub attempts: Value,
    /// Why no further attempt was made.
    pub reason: String,
    /// When the job died.
    pub created_at: DateTime<Utc>,
    /// When an admin replayed it.
    pub replayed_at: Option<DateTime<Utc>>,
    /// The run the replay started.
    pub replay_run: Option<String>,
}

/// Where dead letters are kept.
pub trait DeadLetterStore: Send + Sync {
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
