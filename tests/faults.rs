//! The fault matrix: each fault injected mid-run with real processes, then proof by row
//! counts and per-currency sums that nothing was lost or loaded twice, that the job's
//! accounting balances over its attempts, and that the user was told what happened.
//!
//! | fault | test |
//! |---|---|
//! | the warehouse PostgreSQL crashes and restarts mid-run | `the_warehouse_postgres_crashing_mid_run_loses_nothing` |
//!
//! Rows covered elsewhere: a worker killed with `kill -9` mid-sync
//! (`queue::a_worker_killed_mid_sync_is_taken_over_and_nothing_is_lost_or_doubled`, and in
//! the embedded queue), SIGTERM (`queue::sigterm_lets_the_running_job_finish_before_the_worker_exits`),
//! Redis restarted under a running job (`queue::a_redis_restart_under_a_running_job_loses_nothing`).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use sluice_engine::RunStatus;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::warehouse::RunHistory;
use sluice_workers::{JobStatus, Queues};
use support::jobs::*;
use support::messy_invoices;
use support::private::PrivatePg;
use support::redis::Prefix;

/// The whole job of `run`: its result within `limit`, then its ledger over all attempts.
async fn finished_job(
    queues: &Queues,
    w: &PostgresWarehouse,
    run: &str,
    limit: Duration,
) -> (sluice_workers::JobResult, sluice_engine::JobLedger) {
    let result = tokio::time::timeout(limit, async {
        loop {
            if let Ok(r) = queues.wait(run, Duration::from_millis(200)).await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the job ends");
    let job = w
        .job(&slug("acme"), run)
        .await
        .expect("ledger")
        .expect("the job's runs");
    (result, job)
}

#[tokio::test]
async fn the_warehouse_postgres_crashing_mid_run_loses_nothing() {
    let pg = PrivatePg::start();
    let url = pg.url("postgres");
    let w = PostgresWarehouse::connect(&url)
        .await
        .expect("connect")
        .with_master_key(master());
    w.create_tenant(&slug("acme"), "Acme", &master())
        .await
        .expect("tenant");
    let redis = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let data: PathBuf = dir.path().join("data");
    let (csv, exp) = messy_invoices(40_000, 21);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
    register(&w, &spec).await;
    let queues = Queues::connect(settings(Some((&redis.url, &redis.prefix)), &data))
        .await
        .expect("queues");
    let _workers = Reaper(vec![sluice_worker(
        &WorkerProcess {
            database_url: Some(url.clone()),
            redis: Some((redis.url.clone(), redis.prefix.clone())),
            retry_base_ms: 1000,
        },
        &data,
    )]);

    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    first_batches_committed(&w, &run.run_id).await;
    pg.crash();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_again();

    let (result, job) = finished_job(&queues, &w, &run.run_id, Duration::from_secs(180)).await;
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_eq!(job.whole().status, RunStatus::Succeeded, "{job:?}");
    assert!(
        job.attempts.len() >= 2,
        "the crash failed an attempt: {job:?}"
    );
    let failed = &job.attempts[0];
    assert_eq!(failed.status, RunStatus::Failed);
    let told = failed.error.as_deref().unwrap_or_default();
    assert!(
        told.contains("warehouse unavailable"),
        "the failed attempt says why: {failed:?}"
    );
    let whole = job.whole();
    assert_eq!(whole.counts.rows_read, exp.rows_read, "{job:?}");
    assert_eq!(
        whole.counts.rows_read,
        whole.counts.loaded() + whole.counts.quarantined + whole.counts.deduplicated
    );
    assert_loaded_exactly(&w, &exp).await;
}
