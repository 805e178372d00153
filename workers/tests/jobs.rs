//! Running sync jobs under the retry policy, dead letters and their replay, on the
//! embedded warehouse.

use sluice_engine::prelude::*;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sluice_connectors::{
    BatchStream, HealthReport, ReadRequest, Source, SourceError, SourceErrorKind, StreamInfo,
};
use sluice_engine::RunTrigger;
use sluice_engine::{RunStatus, SqliteWarehouse, TenantSlug};
use sluice_pipelines::{PipelineSource, PipelineSpec, Quiet};
use sluice_workers::jobs::{JobOutcome, SyncJob, run_sync_job};
use sluice_workers::retry::RetryPolicy;

/// Fails the first `failures` reads with a transient error, then reads normally.
struct Flaky {
    inner: PipelineSource,
    failures: u32,
    calls: AtomicU32,
}

impl Source for Flaky {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        self.inner.streams().await
    }
    async fn check(&self) -> Result<HealthReport, SourceError> {
        self.inner.check().await
    }
    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(SourceError::new(
                SourceErrorKind::Transient,
                "connection reset by peer",
            ));
        }
        self.inner.read(request).await
    }
}

fn pipeline(dir: &Path) -> PipelineSpec {
    std::fs::write(
        dir.join("p.toml"),
        "name = \"inv\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"csv\"\npath = \"inv.csv\"\n",
    )
    .expect("toml");
    PipelineSpec::from_file(&dir.join("p.toml")).expect("spec")
}

const CSV: &str = "external_id,issue_date,due_date,currency,total,balance\nA,2024-01-01,2024-01-31,USD,10.00,10.00\nB,2024-01-01,2024-01-31,USD,5.00,0\n";

fn tenant() -> TenantSlug {
    TenantSlug::parse("acme").expect("slug")
}

#[tokio::test]
async fn three_transient_failures_then_success_on_attempt_four() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("inv.csv"), CSV).expect("csv");
    let spec = pipeline(dir.path());
    let source = Flaky {
        inner: PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        failures: 3,
        calls: AtomicU32::new(0),
    };
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let job = SyncJob::new("acme", "inv", RunTrigger::Manual);
    let policy = RetryPolicy::with_base(Duration::from_millis(25));
    let started = Instant::now();
    let outcome = run_sync_job(&job, &spec, &source, &w, &policy, &Quiet)
        .await
        .expect("job");
    let elapsed = started.elapsed();
    let JobOutcome::Succeeded { report, failed } = outcome else {
        panic!("should succeed")
    };
    assert_eq!(failed.len(), 3);
    assert_eq!(report.ledger.run_id, job.attempt_run_id(4));
    assert_eq!(report.ledger.counts.inserted, 2);
    // 25 + 50 + 100 ms of backoff at least.
    assert!(elapsed >= Duration::from_millis(175), "{elapsed:?}");
    // The ledger shows every attempt: three failed runs, then the one that succeeded.
    for n in 1..=3 {
        let run = w
            .run(&tenant(), &job.attempt_run_id(n))
            .await
            .expect("ledger")
            .expect("recorded");
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.trigger.as_str(), "manual");
        assert!(
            run.error
                .as_deref()
                .unwrap_or("")
                .contains("connection reset")
        );
    }
    assert!(
        w.dead_letters(&tenant(), 10)
            .await
            .expect("dead letters")
            .is_empty()
    );
}

#[tokio::test]
async fn a_permanent_failure_is_dead_at_once_with_its_attempt() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = pipeline(dir.path());
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let job = SyncJob::new("acme", "inv", RunTrigger::Cron);
    let policy = RetryPolicy::with_base(Duration::from_millis(1));
    // The file is missing: not worth retrying.
    let JobOutcome::Dead {
        dead_letter,
        failed,
        reason,
    } = run_sync_job(&job, &spec, &source, &w, &policy, &Quiet)
        .await
        .expect("job")
    else {
        panic!("a missing file is permanent")
    };
    assert_eq!(failed.len(), 1);
    assert!(reason.contains("permanent"));
    let letter = w
        .dead_letter(&tenant(), &dead_letter)
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(letter.attempts.as_array().map(Vec::len), Some(1));
    assert!(
        letter.attempts[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("file not found")
    );
    assert_eq!(letter.job["run_id"], job.run_id);
}

#[tokio::test]
async fn a_job_that_keeps_failing_transiently_is_dead_after_five_attempts() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("inv.csv"), CSV).expect("csv");
    let spec = pipeline(dir.path());
    let source = Flaky {
        inner: PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        failures: u32::MAX,
        calls: AtomicU32::new(0),
    };
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let job = SyncJob::new("acme", "inv", RunTrigger::Api);
    let outcome = run_sync_job(
        &job,
        &spec,
        &source,
        &w,
        &RetryPolicy::with_base(Duration::from_millis(1)),
        &Quiet,
    )
    .await
    .expect("job");
    let JobOutcome::Dead {
        failed,
        reason,
        dead_letter,
    } = outcome
    else {
        panic!("cannot succeed")
    };
    assert_eq!(failed.len(), 5);
    assert!(reason.contains("all 5 attempts"));
    assert_eq!(source.calls.load(Ordering::SeqCst), 5);
    let letters = w.dead_letters(&tenant(), 10).await.expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, dead_letter);
    assert!(
        letters[0]
            .attempts
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["transient"] == true))
    );
}
