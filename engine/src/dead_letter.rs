//! Dead letters: jobs that failed permanently or exhausted their retries, kept with every
//! attempt's error and time until an admin replays them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One dead job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
