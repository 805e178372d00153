//! The run ledger: what one run read and where every row went. The accounting invariant
//! lives here and only here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, ErrorKind, Result};

/// How a run ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting in the queue for a worker; nothing read yet. Only an answer about a run
    /// not started: the ledger holds runs from their start.
    Queued,
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
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
        }
    }

    /// Parses a stored word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(RunStatus::Queued),
            "running" => Some(RunStatus::Running),
            "succeeded" => Some(RunStatus::Succeeded),
            "failed" => Some(RunStatus::Failed),
            _ => None,
        }
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

/// A queued job as a whole: the ledgers of its attempts, in order. Attempt 1's run id is
/// the job's; attempt `n` is `<job>.<n>`. An attempt that resumed after an earlier one's
/// committed batches read only the rest, so the job's counts are the attempts' sums: what
/// the source held, read once, each row loaded, quarantined or deduplicated once.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLedger {
    /// The attempts, first to last (never empty).
    pub attempts: Vec<RunLedger>,
}

impl JobLedger {
    /// The job's id of a run id: `<job>.<n>` is attempt `n` of `<job>`.
    pub fn job_id(run_id: &str) -> &str {
        match run_id.rsplit_once('.') {
            Some((job, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => job,
            _ => run_id,
        }
    }

    /// The job as one ledger: the job's id, the first attempt's start, the last attempt's
    /// end, status and error, and the counts summed over the attempts.
    pub fn whole(&self) -> RunLedger {
        let first = &self.attempts[0];
        let last = &self.attempts[self.attempts.len() - 1];
        let mut counts = RowCounts::default();
        for a in &self.attempts {
            counts.add(&a.counts);
        }
        RunLedger {
            run_id: first.run_id.clone(),
            counts,
            started_at: first.started_at,
            finished_at: last.finished_at,
            status: last.status,
            error: last.error.clone(),
            rules_hash: last.rules_hash.clone(),
            ..first.clone()
        }
    }

    /// The job's view: [`RunLedger::view`] of [`JobLedger::whole`], with `attempts`, each
    /// attempt's own view (`attempt`: its number).
    pub fn view(&self) -> RunView {
        let mut v = self.whole().view();
        v.attempts = Some(
            self.attempts
                .iter()
                .enumerate()
                .map(|(i, a)| RunView {
                    attempt: Some(i + 1),
                    ..a.view()
                })
                .collect(),
        );
        v
    }

    /// The job's JSON ([`JobLedger::view`]).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.view()).expect("a run's view is JSON")
    }
}

/// The one shape of a run, shared by `sluice ... --json` and the HTTP API (and its OpenAPI
/// schema): the ledger's fields with its counts flattened and `loaded` (the inserted,
/// updated and unchanged) spelled out, so `rows_read = loaded + quarantined +
/// deduplicated` reads off it. A job's view adds its `attempts`; the API adds `quarantined_by_rule`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"run_id": "0193a1c2-7d3e-7cc1-9f0e-2b1d4e5f6a7b", "tenant": "acme",
    "pipeline": "invoices", "entity": "invoices", "trigger": "api", "status": "succeeded",
    "started_at": "2026-12-05T09:00:00Z", "finished_at": "2026-12-05T09:00:04Z",
    "rows_read": 1000, "loaded": 990, "inserted": 990, "updated": 0, "unchanged": 0,
    "quarantined": 8, "deduplicated": 2, "rules_hash": "3f2a9c", "error": null,
    "quarantined_by_rule": {"currency_code": 8}}))]
pub struct RunView {
    /// The run's id (a job's first attempt's id names the job).
    pub run_id: String,
    /// The tenant.
    pub tenant: String,
    /// The pipeline.
    pub pipeline: String,
    /// The entity it loads.
    pub entity: String,
    /// What started it.
    pub trigger: RunTrigger,
    /// Where it stands.
    pub status: RunStatus,
    /// When it started (a queued run: when it was queued).
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Rows read from the source.
    pub rows_read: u64,
    /// Rows in the warehouse after it: inserted + updated + unchanged.
    pub loaded: u64,
    /// New documents.
    pub inserted: u64,
    /// Changed documents.
    pub updated: u64,
    /// Documents read again unchanged.
    pub unchanged: u64,
    /// Rows set aside in quarantine.
    pub quarantined: u64,
    /// Rows dropped as repeats of a row read earlier in the run.
    pub deduplicated: u64,
    /// The hash of the validation rules it ran.
    pub rules_hash: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Which attempt of its job it is (in a job's `attempts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<usize>,
    /// The job it is an attempt of (an attempt read alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// A job's attempts, each a run.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(no_recursion)]
    pub attempts: Option<Vec<RunView>>,
    /// Quarantined rows per rule over what it covers (the API's `GET /v1/runs/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined_by_rule: Option<std::collections::BTreeMap<String, u64>>,
}

impl RunLedger {
    /// The run's view ([`RunView`]).
    pub fn view(&self) -> RunView {
        let c = &self.counts;
        RunView {
            run_id: self.run_id.clone(),
            tenant: self.tenant.clone(),
            pipeline: self.pipeline.clone(),
            entity: self.entity.clone(),
            trigger: self.trigger,
            status: self.status,
            started_at: self.started_at,
            finished_at: self.finished_at,
            rows_read: c.rows_read,
            loaded: c.loaded(),
            inserted: c.inserted,
            updated: c.updated,
            unchanged: c.unchanged,
            quarantined: c.quarantined,
            deduplicated: c.deduplicated,
            rules_hash: self.rules_hash.clone(),
            error: self.error.clone(),
            attempt: None,
            job_id: None,
            attempts: None,
            quarantined_by_rule: None,
        }
    }

    /// The run's JSON ([`RunLedger::view`]).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.view()).expect("a run's view is JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(id: &str, status: RunStatus, read: u64, error: Option<&str>) -> RunLedger {
        RunLedger {
            run_id: id.into(),
            tenant: "acme".into(),
            pipeline: "invoices".into(),
            entity: "invoices".into(),
            trigger: RunTrigger::Api,
            started_at: Utc::now(),
            finished_at: Some(Utc::now()),
            status,
            counts: RowCounts {
                rows_read: read,
                inserted: read - 2,
                quarantined: 1,
                deduplicated: 1,
                ..RowCounts::default()
            },
            rules_hash: "h".into(),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn a_job_reports_every_attempts_rows_and_its_last_attempts_outcome() {
        let job = JobLedger {
            attempts: vec![
                attempt("j", RunStatus::Failed, 8_192, Some("the worker stopped")),
                attempt("j.2", RunStatus::Succeeded, 1_491_808, None),
            ],
        };
        let whole = job.whole();
        assert_eq!(whole.run_id, "j");
        assert_eq!(whole.counts.rows_read, 1_500_000);
        assert_eq!(whole.counts.quarantined, 2);
        assert_eq!(whole.status, RunStatus::Succeeded);
        assert_eq!(whole.error, None);
        whole.counts.check().expect("the sums balance");
        let v = job.to_json();
        assert_eq!(v["rows_read"], 1_500_000);
        assert_eq!(v["attempts"][0]["error"], "the worker stopped");
        assert_eq!(v["attempts"][1]["run_id"], "j.2");
        assert_eq!(v["attempts"][1]["attempt"], 2);
        assert_eq!(JobLedger::job_id("j.2"), "j");
        assert_eq!(JobLedger::job_id("j.12"), "j");
        assert_eq!(JobLedger::job_id("0192-abc"), "0192-abc");
        assert_eq!(JobLedger::job_id("j."), "j.");
    }
}
