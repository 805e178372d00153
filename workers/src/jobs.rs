//! Jobs and how one is run: a sync of a pipeline, attempted under the retry policy; each
//! attempt is a run of its own in the ledger; a job that fails permanently or exhausts its
//! attempts becomes a dead letter that an admin can replay once the cause is fixed.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sluice_connectors::{Source, SourceErrorKind};
use sluice_engine::control::DeadLetter;
use sluice_engine::warehouse::Warehouse;
use sluice_pipelines::{
    PipelineError, PipelineErrorKind, PipelineSpec, RunObserver, RunOptions, RunReport,
    run_pipeline,
};
use tracing::Instrument;

use crate::error::{WorkerError, WorkerErrorKind};
use crate::retry::{Attempt, Outcome, RetryPolicy, continue_with_retries};

use sluice_engine::{RunStatus, RunTrigger, TenantSlug};

/// Sync one pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncJob {
    /// The tenant.
    pub tenant: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// What asked for it.
    pub trigger: RunTrigger,
    /// The run id handed back to whoever triggered it; the first attempt runs under it.
    pub run_id: String,
    /// Follows the work through logs (the API's request id, or a fresh one).
    pub correlation_id: String,
    /// The token of the pipeline lock the trigger took for this run; the worker takes the
    /// lock over with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_token: Option<String>,
    /// An uploaded file to read instead of the pipeline's own `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<std::path::PathBuf>,
}

impl SyncJob {
    /// A job with fresh run and correlation ids.
    pub fn new(tenant: &str, pipeline: &str, trigger: RunTrigger) -> Self {
        SyncJob {
            tenant: tenant.to_string(),
            pipeline: pipeline.to_string(),
            trigger,
            run_id: uuid::Uuid::now_v7().to_string(),
            correlation_id: uuid::Uuid::now_v7().to_string(),
            lock_token: None,
            file: None,
        }
    }

    /// The run id of attempt `n`: the job's own for the first, then `<run_id>.<n>`.
    pub fn attempt_run_id(&self, n: u32) -> String {
        attempt_run_id(&self.run_id, n)
    }
}

/// The run id of attempt `n` of the job of `run_id`: the job's id, then `<id>.2`, ...
pub fn attempt_run_id(run_id: &str, n: u32) -> String {
    if n <= 1 {
        run_id.to_string()
    } else {
        format!("{run_id}.{n}")
    }
}

/// Which quarantined rows a replay takes: rows of one pipeline, by id, or by filter
/// (pending and fixed rows only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaySelection {
    /// The pipeline whose rows are replayed.
    pub pipeline: String,
    /// These rows; when empty, every pending or fixed row matching the filters below.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Only rows read by this run.
    #[serde(default)]
    pub run_id: Option<String>,
    /// Only rows that failed this rule.
    #[serde(default)]
    pub rule: Option<String>,
}

/// Replay quarantined rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayJob {
    /// The tenant.
    pub tenant: String,
    /// The rows.
    pub selection: ReplaySelection,
    /// The replay's run id.
    pub run_id: String,
    /// Follows the work through logs.
    pub correlation_id: String,
}

/// How a job ended.
#[derive(Debug)]
pub enum JobOutcome {
    /// A run succeeded.
    Succeeded {
        /// The successful run.
        report: Box<RunReport>,
        /// The attempts that failed before it.
        failed: Vec<Attempt>,
    },
    /// The job is dead and recorded as a dead letter.
    Dead {
        /// The dead letter's id.
        dead_letter: String,
        /// Every failed attempt.
        failed: Vec<Attempt>,
        /// Why it is dead.
        reason: String,
    },
}

/// Runs `job` from `source` into `warehouse` under `policy`. Never returns an error for a
/// failed sync: failures are retried and, in the end, recorded as a dead letter.
pub async fn run_sync_job<S: Source, W: Warehouse>(
    job: &SyncJob,
    spec: &PipelineSpec,
    source: &S,
    warehouse: &W,
    policy: &RetryPolicy,
    observer: &dyn RunObserver,
) -> Result<JobOutcome, WorkerError> {
    continue_sync_job(job, Vec::new(), spec, source, warehouse, policy, observer).await
}

/// Like [`run_sync_job`] for a job whose earlier deliveries already made the `prior`
/// attempts (see [`continue_with_retries`]).
pub async fn continue_sync_job<S: Source, W: Warehouse>(
    job: &SyncJob,
    prior: Vec<Attempt>,
    spec: &PipelineSpec,
    source: &S,
    warehouse: &W,
    policy: &RetryPolicy,
    observer: &dyn RunObserver,
) -> Result<JobOutcome, WorkerError> {
    let span = tracing::info_span!("job", tenant = %job.tenant, pipeline = %job.pipeline, run_id = %job.run_id, correlation_id = %job.correlation_id);
    // The last attempt's error, for closing its ledger if the attempt could not (the
    // warehouse was down when it failed).
    let last_error = std::sync::Mutex::new(None::<String>);
    let last_error = &last_error;
    let (outcome, _) = continue_with_retries(
        policy,
        prior,
        |n| {
            let options = RunOptions {
                trigger: job.trigger,
                run_id: Some(job.attempt_run_id(n)),
            };
            async move {
                if n > 1 {
                    let said = last_error.lock().ok().and_then(|mut e| e.take());
                    close_if_open(job, n - 1, said, warehouse).await;
                }
                let run = run_pipeline(spec, source, warehouse, &options, observer);
                let result = match tokio::time::timeout(policy.attempt_timeout, run).await {
                    Ok(result) => result,
                    Err(_) => Err(attempt_timed_out(job, n, policy, warehouse).await),
                };
                if let (Err(e), Ok(mut last)) = (&result, last_error.lock()) {
                    *last = Some(e.to_string());
                }
                result
            }
        },
        PipelineError::is_transient,
    )
    .instrument(span)
    .await;
    match outcome {
        Outcome::Succeeded { value, failed } => Ok(JobOutcome::Succeeded {
            report: Box::new(value),
            failed,
        }),
        Outcome::Dead { failed, reason } => {
            let letter = dead_letter(job, &failed, &reason);
            warehouse.record_dead_letter(&letter).await.map_err(|e| {
                WorkerError::new(
                    WorkerErrorKind::Queue,
                    format!("recording the dead letter: {e}"),
                )
            })?;
            crate::metrics::metrics().dead_letters.inc();
            tracing::error!(dead_letter = %letter.id, %reason, "job is dead");
            Ok(JobOutcome::Dead {
                dead_letter: letter.id,
                failed,
                reason,
            })
        }
    }
}

/// Closes attempt `n`'s ledger as failed if it still says running: an attempt that failed
/// because the warehouse went away could not record its own end.
async fn close_if_open<W: Warehouse>(job: &SyncJob, n: u32, said: Option<String>, warehouse: &W) {
    let Ok(tenant) = TenantSlug::parse(&job.tenant) else {
        return;
    };
    let run_id = job.attempt_run_id(n);
    if let Ok(Some(ledger)) = warehouse.run(&tenant, &run_id).await
        && ledger.status == RunStatus::Running
    {
        let error = said.unwrap_or_else(|| "the attempt failed and could not say why".into());
        if let Err(e) = warehouse
            .finish_run(&tenant, &run_id, RunStatus::Failed, Some(&error))
            .await
        {
            tracing::warn!(error = %e, run = %run_id, "closing the failed attempt's ledger");
        }
    }
}

/// Closes the ledger of an attempt stopped by the job timeout and says why, as a
/// transient failure: the source may answer next time (a lock held by someone else, a
/// query that was slow today).
async fn attempt_timed_out<W: Warehouse>(
    job: &SyncJob,
    attempt: u32,
    policy: &RetryPolicy,
    warehouse: &W,
) -> PipelineError {
    let message = format!(
        "the attempt ran longer than the job timeout of {} s (--job-timeout) and was stopped",
        policy.attempt_timeout.as_secs()
    );
    let run_id = job.attempt_run_id(attempt);
    if let Ok(tenant) = TenantSlug::parse(&job.tenant)
        && let Ok(Some(ledger)) = warehouse.run(&tenant, &run_id).await
        && ledger.status == RunStatus::Running
        && let Err(e) = warehouse
            .finish_run(&tenant, &run_id, RunStatus::Failed, Some(&message))
            .await
    {
        tracing::warn!(error = %e, run = %run_id, "closing the ledger of a timed-out attempt");
    }
    tracing::warn!(run = %run_id, "{message}");
    PipelineError::new(
        PipelineErrorKind::Source(SourceErrorKind::Transient),
        message,
    )
}

/// The dead letter of a sync job that failed for good.
pub fn dead_letter(job: &SyncJob, failed: &[Attempt], reason: &str) -> DeadLetter {
    DeadLetter {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: job.tenant.clone(),
        pipeline: job.pipeline.clone(),
        job_kind: "sync".into(),
        job: serde_json::to_value(job).unwrap_or_default(),
        attempts: serde_json::to_value(failed).unwrap_or_default(),
        reason: reason.to_string(),
        created_at: Utc::now(),
        replayed_at: None,
        replay_run: None,
    }
}

/// The dead letter of a replay job that failed for good.
pub fn replay_dead_letter_record(job: &ReplayJob, failed: &[Attempt], reason: &str) -> DeadLetter {
    DeadLetter {
        job_kind: "replay".into(),
        pipeline: job.selection.pipeline.clone(),
        job: serde_json::to_value(job).unwrap_or_default(),
        ..dead_letter(
            &SyncJob {
                tenant: job.tenant.clone(),
                pipeline: job.selection.pipeline.clone(),
                trigger: RunTrigger::Replay,
                run_id: job.run_id.clone(),
                correlation_id: job.correlation_id.clone(),
                lock_token: None,
                file: None,
            },
            failed,
            reason,
        )
    }
}
