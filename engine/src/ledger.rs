//! The run ledger: what one run read and where every row went. The accounting invariant
//! lives here and only here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, ErrorKind, Result};

/// How a run ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still reading or loading.
    Running,
    /// Every row read was loaded, quarantined or deduplicated, and the counts add up.
    Succeeded,
    /// Stopped early; what was committed stays committed and the next run resumes after it.
    Failed,
}

impl RunStatus {
    /// The word stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
        }
    }

    /// Parses a stored word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(RunStatus::Running),
            "succeeded" => Some(RunStatus::Succeeded),
            "failed" => Some(RunStatus::Failed),
            _ => None,
        }
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunTrigger {
    /// `sluice sync` at a shell.
    Cli,
    /// The scheduler, on a pipeline's cron tick.
    Cron,
    /// An operator: `sluice trigger` or the console.
    Manual,
    /// A client of the HTTP API.
    Api,
    /// An admin replaying a dead letter or quarantined rows.
    Replay,
}

impl RunTrigger {
    /// The word stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            RunTrigger::Cli => "cli",
            RunTrigger::Cron => "cron",
            RunTrigger::Manual => "manual",
            RunTrigger::Api => "api",
            RunTrigger::Replay => "replay",
        }
    }

    /// Parses a stored word.
    pub fn parse(s: &str) -> Option<Self> {
        [
            RunTrigger::Cli,
            RunTrigger::Cron,
            RunTrigger::Manual,
            RunTrigger::Api,
            RunTrigger::Replay,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// Where the rows of a run (or of one batch) went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowCounts {
    /// Records the source produced, good and bad.
    pub rows_read: u64,
    /// New rows written to the warehouse.
    pub inserted: u64,
    /// Existing rows replaced by a newer version.
    pub updated: u64,
    /// Rows whose warehouse copy was already the same or newer.
    pub unchanged: u64,
    /// Rows set aside for an admin.
    pub quarantined: u64,
    /// Rows superseded by another row of the same run with the same `external_id`.
    pub deduplicated: u64,
}

impl RowCounts {
    /// Rows that reached the warehouse in their final form: inserted + updated + unchanged.
    pub fn loaded(&self) -> u64 {
        self.inserted + self.updated + self.unchanged
    }

    /// Adds another batch's counts.
    pub fn add(&mut self, other: &RowCounts) {
        self.rows_read += other.rows_read;
        self.inserted += other.inserted;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.quarantined += other.quarantined;
        self.deduplicated += other.deduplicated;
    }

    /// The accounting invariant: every row read is loaded, quarantined or deduplicated,
    /// exactly once. A run that breaks it fails, whatever else went well.
    pub fn check(&self) -> Result<()> {
        let accounted = self.loaded() + self.quarantined + self.deduplicated;
        if accounted == self.rows_read {
            Ok(())
        } else {
            Err(EngineError::new(
                ErrorKind::AccountingMismatch,
                format!(
                    "rows_read {} != inserted {} + updated {} + unchanged {} + quarantined {} + deduplicated {} (= {accounted})",
                    self.rows_read,
                    self.inserted,
                    self.updated,
                    self.unchanged,
                    self.quarantined,
                    self.deduplicated
                ),
            ))
        }
    }
}

/// One run's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLedger {
    /// The run's id (a UUIDv7, so ids sort by start time).
    pub run_id: String,
    /// The tenant whose warehouse the run loaded.
    pub tenant: String,
    /// The pipeline's name (the `source` of every row it loads).
    pub pipeline: String,
    /// What the pipeline loads.
    pub entity: String,
    /// What started the run.
    pub trigger: RunTrigger,
    /// When the run started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// How it ended.
    pub status: RunStatus,
    /// Where its rows went.
    #[serde(flatten)]
    pub counts: RowCounts,
    /// Hash of the rule set it applied.
    pub rules_hash: String,
    /// Why it failed.
    pub error: Option<String>,
}

impl RunLedger {
    /// The one JSON shape of a run, shared by `sluice ... --json` and the HTTP API: the
    /// ledger's fields with its counts flattened and `loaded` (inserted + updated +
    /// unchanged) spelled out.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.counts;
        serde_json::json!({
            "run_id": self.run_id, "tenant": self.tenant, "pipeline": self.pipeline,
            "entity": self.entity, "trigger": self.trigger, "status": self.status,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "rows_read": c.rows_read, "loaded": c.loaded(), "inserted": c.inserted,
            "updated": c.updated, "unchanged": c.unchanged, "quarantined": c.quarantined,
            "deduplicated": c.deduplicated, "rules_hash": self.rules_hash, "error": self.error,
        })
    }
}
