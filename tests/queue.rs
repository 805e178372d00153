//! Queued syncs end to end: triggers that join a running run, schedulers that fire each
//! tick once, a worker killed with SIGKILL mid-sync whose job another worker finishes, and
//! a Redis restarted under a running job. Real Redis and PostgreSQL; the embedded queue
//! where the behaviour must match.

mod support;

use sluice_engine::prelude::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use sluice_engine::RunTrigger;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::{RunStatus, SqliteWarehouse, Warehouse};
use sluice_workers::retry::RetryPolicy;
use sluice_workers::scheduler::{CatchUp, Scheduler, SchedulerOptions};
use sluice_workers::worker::{WorkerEnv, WorkerOptions};
use sluice_workers::{
    IdempotencyKey, JobStatus, QueueName, Queues, TriggerOutcome, TriggerRequest,
};
use support::jobs::*;
use support::messy_invoices;
use support::pg::TestDb;
use support::redis::{Prefix, PrivateRedis};

/// Ten triggers at once: one run queued, nine joined; a keyed trigger joins too and its key
/// keeps returning that run.
async fn ten_triggers_make_one_run(queues: Arc<Queues>) {
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let q = queues.clone();
            tokio::spawn(async move { q.trigger(&manual("invoices")).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("join").expect("trigger"));
    }
    let enqueued: Vec<_> = outcomes
        .iter()
        .filter(|t| t.outcome == TriggerOutcome::Enqueued)
        .collect();
    assert_eq!(enqueued.len(), 1, "{outcomes:?}");
    let run = &enqueued[0].run_id;
    assert!(outcomes.iter().all(|t| &t.run_id == run), "{outcomes:?}");
    assert_eq!(
        outcomes
            .iter()
            .filter(|t| t.outcome == TriggerOutcome::Joined)
            .count(),
        9
    );
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 1);

    let keyed = TriggerRequest {
        idempotency_key: Some(IdempotencyKey::Client("nightly-2026-11-22".into())),
        ..manual("invoices")
    };
    let first = queues.trigger(&keyed).await.expect("keyed");
    assert_eq!(&first.run_id, run);
    // Another pipeline is not blocked by this one's run.
    let other = queues.trigger(&manual("bills")).await.expect("other");
    assert_eq!(other.outcome, TriggerOutcome::Enqueued);
    assert_ne!(&other.run_id, run);
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 2);

    // Keys are per pipeline and namespaced: a client key that spells the scheduler's key
    // for a tick (or reuses another pipeline's key) never makes that tick skip.
    let at = 1_764_000_000_000i64;
    for key in [
        format!("cron:reports:{at}"),
        format!("cron:{at}"),
        "nightly-2026-11-22".into(),
    ] {
        let spoof = TriggerRequest {
            idempotency_key: Some(IdempotencyKey::Client(key)),
            ..manual("bills")
        };
        assert_eq!(
            queues.trigger(&spoof).await.expect("spoof").run_id,
            other.run_id
        );
    }
    let tick = TriggerRequest {
        idempotency_key: Some(IdempotencyKey::CronTick(at)),
        trigger: RunTrigger::Cron,
        ..manual("reports")
    };
    let fired = queues.trigger(&tick).await.expect("tick");
    assert_eq!(fired.outcome, TriggerOutcome::Enqueued, "{fired:?}");
    let again = queues.trigger(&tick).await.expect("tick again");
    assert_eq!(again.run_id, fired.run_id);
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 3);
}

#[tokio::test]
async fn ten_concurrent_triggers_make_one_run_in_redis() {
    let p = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let queues = Queues::connect(settings(Some((&p.url, &p.prefix)), dir.path()))
        .await
        .expect("Redis must be reachable");
    ten_triggers_make_one_run(Arc::new(queues)).await;
}

#[tokio::test]
async fn ten_concurrent_triggers_make_one_run_in_the_embedded_queue() {
    let dir = tempfile::tempdir().expect("tmp");
    let queues = Queues::connect(settings(None, dir.path()))
        .await
        .expect("embedded queue");
    ten_triggers_make_one_run(Arc::new(queues)).await;
}

/// A trigger while a run is running never joins it (the run may have read past what the
/// trigger asks to see): it queues one run behind it, which later triggers (and the same
/// cron tick from another scheduler) join, and which the running run's release puts in
/// the queue.
async fn a_trigger_during_a_running_run_queues_one_behind_it(queues: Arc<Queues>) {
    let coord = queues.coordinator();
    let ttl = Duration::from_secs(30);
    let sluice_workers::coord::Acquired::Held(queued) = coord
        .acquire("acme", "invoices", "run-a", ttl)
        .await
        .expect("acquire")
    else {
        panic!("a free lock is taken")
    };
    let running = coord
        .claim(&queued, "worker-1", ttl)
        .await
        .expect("claim")
        .expect("the worker takes its run's lock");

    let first = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(first.outcome, TriggerOutcome::Enqueued, "{first:?}");
    assert_ne!(first.run_id, "run-a", "a started run is never joined");
    assert_eq!(
        queues.depth(QueueName::Sync).await.expect("depth"),
        0,
        "it waits behind the running run, not in the queue"
    );
    let second = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(second.outcome, TriggerOutcome::Joined);
    assert_eq!(second.run_id, first.run_id);
    let at = 1_800_000_000_000i64;
    let tick = TriggerRequest {
        idempotency_key: Some(IdempotencyKey::CronTick(at)),
        trigger: RunTrigger::Cron,
        ..manual("invoices")
    };
    let (a, b) = tokio::join!(queues.trigger(&tick), queues.trigger(&tick));
    let (a, b) = (a.expect("tick"), b.expect("tick"));
    assert_eq!(a.run_id, first.run_id, "{a:?}");
    assert_eq!(b.run_id, first.run_id, "{b:?}");

    // The running run ends: the lock goes to the run behind it, whose job is queued.
    assert!(queues.release(&running).await.expect("release"));
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 1);
    assert!(
        !queues.release(&running).await.expect("release again"),
        "released once"
    );
    let third = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(third.outcome, TriggerOutcome::Joined, "{third:?}");
    assert_eq!(third.run_id, first.run_id, "queued and not started: joined");
    // The same tick fired again is still that run.
    assert_eq!(
        queues.trigger(&tick).await.expect("tick").run_id,
        first.run_id
    );
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 1);
}

#[tokio::test]
async fn a_trigger_during_a_running_run_queues_one_behind_it_in_redis() {
    let p = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let queues = Queues::connect(settings(Some((&p.url, &p.prefix)), dir.path()))
        .await
        .expect("Redis must be reachable");
    a_trigger_during_a_running_run_queues_one_behind_it(Arc::new(queues)).await;
}

#[tokio::test]
async fn a_trigger_during_a_running_run_queues_one_behind_it_in_the_embedded_queue() {
    let dir = tempfile::tempdir().expect("tmp");
    let queues = Queues::connect(settings(None, dir.path()))
        .await
        .expect("embedded queue");
    a_trigger_during_a_running_run_queues_one_behind_it(Arc::new(queues)).await;
}

/// No wait before a run recorded as waiting counts as never pushed (the trigger that took
/// it is taken to have died at once).
fn no_grace(mut s: sluice_workers::QueueSettings) -> sluice_workers::QueueSettings {
    s.pending_grace = Duration::ZERO;
    s
}

/// A trigger that took a free lock and recorded its tick (one step), then died (or lost
/// its queue) before pushing the job: the next trigger finds the run waiting and pushes it,
/// instead of joining a run no job will ever start. And a run handed the lock by a release whose
/// worker died before pushing: a worker waiting for the lock pushes it.
async fn a_run_whose_push_never_happened_is_pushed_by_the_next_comer(queues: Arc<Queues>) {
    let coord = queues.coordinator();
    let ttl = Duration::from_secs(30);
    let job = |run: &str, token: &str| sluice_workers::jobs::SyncJob {
        tenant: "acme".into(),
        pipeline: "invoices".into(),
        trigger: RunTrigger::Cron,
        run_id: run.into(),
        correlation_id: "c".into(),
        lock_token: Some(token.into()),
        file: None,
    };
    let lease = coord.lease("acme", "invoices", "run-dead", "t0");
    let text = serde_json::to_string(&job("run-dead", "t0")).expect("json");
    let at = 1_800_000_000_000i64;
    let key = IdempotencyKey::CronTick(at).scoped("invoices");
    assert!(matches!(
        coord
            .acquire_queued(&lease, &text, ttl, Some(("acme", &key)))
            .await
            .expect("acquire"),
        sluice_workers::coord::Acquired::Held(_)
    ));
    // ... and the trigger died here, before pushing the job.
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 0);
    let tick = TriggerRequest {
        idempotency_key: Some(IdempotencyKey::CronTick(at)),
        trigger: RunTrigger::Cron,
        ..manual("invoices")
    };
    let again = queues.trigger(&tick).await.expect("the tick again");
    assert_eq!(again.run_id, "run-dead");
    assert_eq!(
        queues.depth(QueueName::Sync).await.expect("depth"),
        1,
        "the waiting run's job is pushed"
    );
    let later = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(later.run_id, "run-dead", "a later trigger joins it");
    assert_eq!(
        queues.depth(QueueName::Sync).await.expect("depth"),
        1,
        "pushed once"
    );

    // The run starts; one is queued behind it; the release hands the lock over and the
    // releaser dies before pushing.
    let running = coord
        .claim(&lease, "worker-1", ttl)
        .await
        .expect("claim")
        .expect("taken");
    let behind = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(behind.outcome, TriggerOutcome::Enqueued);
    let handed = coord.release(&running, ttl).await.expect("release");
    assert!(matches!(
        handed,
        sluice_workers::coord::Released::HandedOver(_)
    ));
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 1);
    assert!(
        queues.push_pending(&lease.key).await.expect("push"),
        "a worker waiting for the lock pushes the handed-over run"
    );
    assert_eq!(queues.depth(QueueName::Sync).await.expect("depth"), 2);
    assert!(
        !queues.push_pending(&lease.key).await.expect("push"),
        "once"
    );
}

#[tokio::test]
async fn a_run_whose_push_never_happened_is_pushed_by_the_next_comer_in_redis() {
    let p = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let queues = Queues::connect(no_grace(settings(Some((&p.url, &p.prefix)), dir.path())))
        .await
        .expect("Redis must be reachable");
    a_run_whose_push_never_happened_is_pushed_by_the_next_comer(Arc::new(queues)).await;
}

#[tokio::test]
async fn a_run_whose_push_never_happened_is_pushed_by_the_next_comer_in_the_embedded_queue() {
    let dir = tempfile::tempdir().expect("tmp");
    let queues = Queues::connect(no_grace(settings(None, dir.path())))
        .await
        .expect("embedded queue");
    a_run_whose_push_never_happened_is_pushed_by_the_next_comer(Arc::new(queues)).await;
}

async fn finished_runs<W: Warehouse>(w: &W, pipeline: &str) -> Vec<sluice_engine::RunLedger> {
    w.runs(&slug("acme"), Some(pipeline), 100)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.status != RunStatus::Running)
        .collect()
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().expect("instant")
}

#[tokio::test]
async fn two_schedulers_fire_each_tick_once_and_catch_up_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let (csv, _) = messy_invoices(50, 7);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 1000, Some("*/2 * * * * *"));
    let store = Arc::new(SqliteWarehouse::new(&data));
    register(&*store, &spec).await;

    // Two scheduler replicas with connections of their own, and a worker.
    let qa = Arc::new(Queues::connect(settings(None, &data)).await.expect("q"));
    let qb = Arc::new(Queues::connect(settings(None, &data)).await.expect("q"));
    let env = Arc::new(WorkerEnv::new(
        store.clone(),
        qa.clone(),
        RetryPolicy::with_base(Duration::from_millis(10)),
        support::confinement(&std::env::temp_dir()),
    ));
    let workers = start_workers(env, WorkerOptions::default());
    let options = SchedulerOptions::default();
    let mut a = Scheduler::new(store.clone(), qa.clone(), options.clone());
    let mut b = Scheduler::new(store.clone(), qb.clone(), options.clone());

    let t0 = 1_800_000_000; // an even second
    assert_eq!(
        a.pass(at(t0)).await.expect("pass").0,
        0,
        "no tick before start"
    );
    assert_eq!(b.pass(at(t0)).await.expect("pass").0, 0);
    for k in 1..=3 {
        let t = at(t0 + 2 * k);
        // The replicas pass at different instants within the tick's second.
        let later = t + chrono::Duration::milliseconds(370);
        let (ra, rb) = tokio::join!(
            a.pass(t + chrono::Duration::milliseconds(120)),
            b.pass(later)
        );
        assert_eq!(ra.expect("a").0, 1, "replica a sees tick {k} due");
        assert_eq!(rb.expect("b").0, 1, "replica b sees tick {k} due");
        eventually(Duration::from_secs(30), "the tick's run", || async {
            finished_runs(&*store, "invoices").await.len() == k as usize
        })
        .await;
    }
    // The same instant again fires nothing.
    assert_eq!(a.pass(at(t0 + 6)).await.expect("pass").0, 0);
    let runs = finished_runs(&*store, "invoices").await;
    assert_eq!(runs.len(), 3, "one run per tick, not one per replica");
    assert!(runs.iter().all(|r| r.trigger.as_str() == "cron"));

    // A scheduler starting after a 10 s outage makes up the missed ticks with one run...
    let mut c = Scheduler::new(store.clone(), qb.clone(), options.clone());
    assert_eq!(c.pass(at(t0 + 16)).await.expect("pass").0, 1);
    eventually(Duration::from_secs(30), "the catch-up run", || async {
        finished_runs(&*store, "invoices").await.len() == 4
    })
    .await;
    // ... or none when told to skip them.
    let mut d = Scheduler::new(
        store.clone(),
        qb.clone(),
        SchedulerOptions {
            catch_up: CatchUp::Skip,
            ..options.clone()
        },
    );
    assert_eq!(d.pass(at(t0 + 30)).await.expect("pass").0, 0);

    // A schedule changed in the store applies without a restart.
    let yearly = write_pipeline(dir.path(), "invoices", &csv, 1000, Some("0 0 0 1 1 *"));
    register(&*store, &yearly).await;
    assert_eq!(c.pass(at(t0 + 40)).await.expect("pass").0, 0);
    let back = write_pipeline(dir.path(), "invoices", &csv, 1000, Some("*/2 * * * * *"));
    register(&*store, &back).await;
    assert_eq!(c.pass(at(t0 + 42)).await.expect("pass").0, 1);

    let text = sluice_workers::metrics::render();
    assert!(text.contains("sluice_scheduler_ticks_total"), "{text}");
    assert!(text.contains("sluice_jobs_succeeded_total{queue=\"sync\"}"));
    stop_workers(workers).await;
}

/// PostgreSQL, a Redis prefix and a registered pipeline over a generated file.
struct Fixture {
    db: TestDb,
    redis: Prefix,
    dir: tempfile::TempDir,
    w: PostgresWarehouse,
    exp: support::Expected,
    queues: Queues,
}

impl Fixture {
    async fn new(rows: usize, seed: u64) -> Self {
        let db = TestDb::create().await;
        let redis = Prefix::new();
        let dir = tempfile::tempdir().expect("tmp");
        let w = acme_warehouse(&db.url).await;
        let (csv, exp) = messy_invoices(rows, seed);
        let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
        register(&w, &spec).await;
        let queues = Queues::connect(settings(
            Some((&redis.url, &redis.prefix)),
            &dir.path().join("data"),
        ))
        .await
        .expect("queues");
        Fixture {
            db,
            redis,
            dir,
            w,
            exp,
            queues,
        }
    }
}

/// A `sluice worker` process.
fn spawn_worker(db: &TestDb, redis: &Prefix, data: &Path) -> Child {
    worker_command(Some((db, redis)), data)
}

/// A `sluice worker` process on PostgreSQL and Redis, or on the embedded warehouse and
/// queue of `data`.
fn worker_command(services: Option<(&TestDb, &Prefix)>, data: &Path) -> Child {
    sluice_worker(
        &WorkerProcess {
            database_url: services.map(|(db, _)| db.url.clone()),
            redis: services.map(|(_, r)| (r.url.clone(), r.prefix.clone())),
            retry_base_ms: 100,
            lease_ms: 3000,
        },
        data,
    )
}

#[tokio::test]
async fn a_worker_killed_mid_sync_is_taken_over_and_nothing_is_lost_or_doubled() {
    let Fixture {
        db,
        redis,
        dir,
        w,
        exp,
        queues,
    } = Fixture::new(40_000, 11).await;

    let mut workers = Reaper(vec![spawn_worker(&db, &redis, &dir.path().join("data"))]);
    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    // Kill the worker once some batches, not all, have committed.
    first_batches_committed(&w, &run.run_id).await;
    kill_9(&mut workers.0[0]);
    let at_kill = w
        .run(&slug("acme"), &run.run_id)
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(
        at_kill.status,
        RunStatus::Running,
        "the sync must still be running when its worker dies"
    );

    // Another worker takes the job over after the heartbeat timeout and finishes it.
    workers
        .0
        .push(spawn_worker(&db, &redis, &dir.path().join("data")));
    let result = tokio::time::timeout(
        Duration::from_secs(120),
        queues.wait(&run.run_id, Duration::from_millis(200)),
    )
    .await
    .expect("the job ends")
    .expect("result");
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    let second = format!("{}.2", run.run_id);
    assert_eq!(result.final_run_id.as_deref(), Some(second.as_str()));

    let first = w
        .run(&slug("acme"), &run.run_id)
        .await
        .expect("ledger")
        .expect("first attempt");
    assert_eq!(first.status, RunStatus::Failed);
    assert!(
        first.error.as_deref().unwrap_or("").contains("stopped"),
        "{first:?}"
    );
    let retried = w
        .run(&slug("acme"), &second)
        .await
        .expect("ledger")
        .expect("second attempt");
    assert_eq!(retried.status, RunStatus::Succeeded);
    // Attempt 2 resumed after attempt 1's committed batches: every record read once.
    assert_eq!(
        first.counts.rows_read + retried.counts.rows_read,
        exp.rows_read
    );
    assert_loaded_exactly(&w, &exp).await;
}

#[tokio::test]
async fn a_sync_asked_for_while_one_runs_starts_when_it_ends_and_reads_everything() {
    let Fixture {
        db,
        redis,
        dir,
        w,
        exp,
        queues,
    } = Fixture::new(20_000, 15).await;
    let _workers = Reaper(vec![spawn_worker(&db, &redis, &dir.path().join("data"))]);
    let first = queues.trigger(&manual("invoices")).await.expect("trigger");
    first_batches_committed(&w, &first.run_id).await;
    let second = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(second.outcome, TriggerOutcome::Enqueued, "{second:?}");
    assert_ne!(second.run_id, first.run_id);
    for run in [&first.run_id, &second.run_id] {
        let result = tokio::time::timeout(
            Duration::from_secs(120),
            queues.wait(run, Duration::from_millis(100)),
        )
        .await
        .expect("the job ends")
        .expect("result");
        assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    }
    let (a, b) = (
        w.run(&slug("acme"), &first.run_id).await.expect("ledger"),
        w.run(&slug("acme"), &second.run_id).await.expect("ledger"),
    );
    let (a, b) = (a.expect("first run"), b.expect("second run"));
    assert!(
        b.started_at >= a.finished_at.expect("first finished"),
        "{a:?} {b:?}"
    );
    assert_eq!(
        b.counts.rows_read, exp.rows_read,
        "the second run reads the whole source"
    );
    assert_eq!(b.counts.inserted, 0, "{b:?}");
    assert_loaded_exactly(&w, &exp).await;
}

#[tokio::test]
async fn a_redis_restart_under_a_running_job_loses_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
        .with_test_writer()
        .try_init();
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir).expect("dir");
    let mut redis = PrivateRedis::start(&redis_dir);
    let url = redis.url();
    let w = Arc::new(acme_warehouse(&db.url).await);
    let (csv, exp) = messy_invoices(30_000, 12);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
    register(&*w, &spec).await;
    let data: PathBuf = dir.path().join("data");
    let queues = Arc::new(
        Queues::connect(settings(Some((&url, "sluice")), &data))
            .await
            .expect("queues"),
    );
    let env = Arc::new(WorkerEnv::new(
        w.clone(),
        queues.clone(),
        RetryPolicy::with_base(Duration::from_millis(100)),
        support::confinement(&std::env::temp_dir()),
    ));
    let workers = start_workers(
        env,
        WorkerOptions {
            concurrency: 1,
            ..WorkerOptions::default()
        },
    );

    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    first_batches_committed(&*w, &run.run_id).await;
    redis.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();

    let result = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            // The coordinator reconnects by itself; errors while Redis is down are retried.
            if let Ok(r) = queues.wait(&run.run_id, Duration::from_millis(200)).await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the job ends");
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_loaded_exactly(&*w, &exp).await;
    let runs = w
        .runs(&slug("acme"), Some("invoices"), 10)
        .await
        .expect("runs");
    let read: u64 = runs.iter().map(|r| r.counts.rows_read).sum();
    assert_eq!(
        read, exp.rows_read,
        "every record read exactly once: {runs:?}"
    );

    // The workers reconnected: a job queued after the restart runs too.
    let again = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(again.outcome, TriggerOutcome::Enqueued);
    let result = tokio::time::timeout(
        Duration::from_secs(120),
        queues.wait(&again.run_id, Duration::from_millis(200)),
    )
    .await
    .expect("the second job ends")
    .expect("result");
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_loaded_exactly(&*w, &exp).await;
    stop_workers(workers).await;
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_before_the_worker_exits() {
    let Fixture {
        db,
        redis,
        dir,
        w,
        exp,
        queues,
    } = Fixture::new(20_000, 13).await;
    let mut workers = Reaper(vec![spawn_worker(&db, &redis, &dir.path().join("data"))]);
    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    first_batches_committed(&w, &run.run_id).await;
    let worker = &mut workers.0[0];
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .expect("kill -TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = worker.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
    // It stopped only after the job ended, in one attempt.
    let result = queues
        .coordinator()
        .result(&run.run_id)
        .await
        .expect("result")
        .expect("the job finished before the worker exited");
    assert!(result.contains("succeeded"), "{result}");
    let ledger = w
        .run(&slug("acme"), &run.run_id)
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(ledger.status, RunStatus::Succeeded);
    assert_eq!(ledger.counts.rows_read, exp.rows_read);
    assert_loaded_exactly(&w, &exp).await;
}

#[tokio::test]
async fn a_replay_job_loads_fixed_rows_into_postgres_and_keeps_the_rest_pending() {
    use sluice_engine::quarantine::{QuarantineFilter, QuarantineStatus};
    use sluice_workers::jobs::ReplaySelection;
    let db = TestDb::create().await;
    let redis = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let w = Arc::new(acme_warehouse(&db.url).await);
    let (csv, exp) = messy_invoices(2_000, 14);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
    register(&*w, &spec).await;
    let queues = Arc::new(
        Queues::connect(settings(
            Some((&redis.url, &redis.prefix)),
            &dir.path().join("data"),
        ))
        .await
        .expect("queues"),
    );
    let env = Arc::new(WorkerEnv::new(
        w.clone(),
        queues.clone(),
        RetryPolicy::with_base(Duration::from_millis(10)),
        support::confinement(&std::env::temp_dir()),
    ));
    let workers = start_workers(env, WorkerOptions::default());
    let sync = queues.trigger(&manual("invoices")).await.expect("trigger");
    assert_eq!(
        job_result(&queues, &sync.run_id).await.status,
        JobStatus::Succeeded
    );
    let tenant = slug("acme");
    let all = QuarantineFilter {
        limit: Some(100_000),
        ..QuarantineFilter::default()
    };
    let quarantined = w.quarantined(&tenant, &all).await.expect("quarantine");
    assert_eq!(quarantined.len() as u64, exp.quarantined);

    // Replaying everything unchanged: all fail again, nothing loaded, nothing duplicated.
    let selection = ReplaySelection {
        pipeline: "invoices".into(),
        ids: Vec::new(),
        run_id: None,
        rule: None,
    };
    let replay = queues
        .replay("acme", selection.clone(), None)
        .await
        .expect("replay");
    let result = job_result(&queues, &replay.run_id).await;
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    let ledger = w
        .run(&tenant, &replay.run_id)
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(ledger.trigger.as_str(), "replay");
    assert_eq!(ledger.counts.rows_read, exp.quarantined);
    assert_eq!(ledger.counts.quarantined, exp.quarantined);
    assert_eq!(
        w.quarantined(&tenant, &all).await.expect("q").len() as u64,
        exp.quarantined
    );

    // Fix the rows with a bad currency (as the API's PATCH will), then replay them.
    let bad: Vec<String> = quarantined
        .iter()
        .filter(|r| r.errors.iter().any(|e| e.rule == "currency_code") && r.errors.len() == 1)
        .map(|r| r.id.clone())
        .collect();
    assert!(!bad.is_empty(), "the generator makes bad currencies");
    let mut conn = db.connect().await;
    fix_currencies(&mut conn, &bad).await;
    let before = w.invoices(&tenant).await.expect("invoices").len();
    let fixed = queues
        .replay(
            "acme",
            ReplaySelection {
                ids: bad.clone(),
                ..selection
            },
            None,
        )
        .await
        .expect("replay");
    assert_eq!(
        job_result(&queues, &fixed.run_id).await.status,
        JobStatus::Succeeded
    );
    let ledger = w
        .run(&tenant, &fixed.run_id)
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(ledger.counts.rows_read, bad.len() as u64);
    assert_eq!(ledger.counts.quarantined, 0);
    let after = w.invoices(&tenant).await.expect("invoices").len();
    assert_eq!(
        (after - before) as u64
            + ledger.counts.updated
            + ledger.counts.unchanged
            + ledger.counts.deduplicated,
        bad.len() as u64
    );
    for id in &bad {
        let row = w
            .quarantined_row(&tenant, id)
            .await
            .expect("row")
            .expect("present");
        assert_eq!(row.status, QuarantineStatus::Replayed);
    }
    let pending = QuarantineFilter {
        status: Some(QuarantineStatus::Pending),
        limit: Some(100_000),
        ..QuarantineFilter::default()
    };
    assert_eq!(
        w.quarantined(&tenant, &pending).await.expect("q").len(),
        quarantined.len() - bad.len()
    );
    stop_workers(workers).await;
}

#[tokio::test]
async fn a_worker_killed_mid_sync_is_taken_over_in_the_embedded_queue_too() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let w = SqliteWarehouse::new(&data);
    let (csv, exp) = messy_invoices(40_000, 15);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
    register(&w, &spec).await;
    let queues = Queues::connect(settings(None, &data))
        .await
        .expect("queues");
    let mut workers = Reaper(vec![worker_command(None, &data)]);
    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    first_batches_committed(&w, &run.run_id).await;
    kill_9(&mut workers.0[0]);
    let at_kill = w
        .run(&slug("acme"), &run.run_id)
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(
        at_kill.status,
        RunStatus::Running,
        "the sync must still be running when its worker dies"
    );
    workers.0.push(worker_command(None, &data));
    let result = tokio::time::timeout(
        Duration::from_secs(120),
        queues.wait(&run.run_id, Duration::from_millis(200)),
    )
    .await
    .expect("the job ends")
    .expect("result");
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    let runs = w
        .runs(&slug("acme"), Some("invoices"), 10)
        .await
        .expect("runs");
    assert_eq!(runs.len(), 2, "{runs:?}");
    let read: u64 = runs.iter().map(|r| r.counts.rows_read).sum();
    assert_eq!(read, exp.rows_read);
    assert_loaded_exactly(&w, &exp).await;

    // What the user is told is the job whole: every record of the file read once across
    // both attempts, each attempt beneath with its own ledger and error.
    let shown = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(&data)
        .env_remove("SLUICE_DATABASE_URL")
        .args(["runs", "show", &run.run_id, "--json"])
        .output()
        .expect("runs show");
    assert!(shown.status.success(), "{shown:?}");
    let job: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    assert_eq!(job["run_id"], run.run_id.as_str());
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["rows_read"], exp.rows_read);
    assert_eq!(
        job["loaded"].as_u64().expect("loaded")
            + job["quarantined"].as_u64().expect("quarantined")
            + job["deduplicated"].as_u64().expect("deduplicated"),
        exp.rows_read
    );
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["status"], "failed");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("stopped"),
        "{job}"
    );
    assert_eq!(attempts[1]["run_id"], format!("{}.2", run.run_id));
}

#[tokio::test]
async fn a_dead_sync_is_replayed_through_the_queue_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let w = Arc::new(SqliteWarehouse::new(&data));
    let (csv, exp) = messy_invoices(500, 31);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 100, None);
    register(&*w, &spec).await;
    // The file goes missing: the sync dies at once (not worth retrying).
    let file = dir.path().join("invoices.csv");
    std::fs::remove_file(&file).expect("remove");
    let queues = Arc::new(
        Queues::connect(settings(None, &data))
            .await
            .expect("queues"),
    );
    let env = Arc::new(WorkerEnv::new(
        w.clone(),
        queues.clone(),
        RetryPolicy::with_base(Duration::from_millis(10)),
        support::confinement(&std::env::temp_dir()),
    ));
    let workers = start_workers(env, WorkerOptions::default());
    let tenant = slug("acme");
    let sync = queues.trigger(&manual("invoices")).await.expect("trigger");
    let dead = job_result(&queues, &sync.run_id).await;
    assert_eq!(dead.status, JobStatus::Dead, "{dead:?}");
    let letter = dead.dead_letter.expect("a dead letter");

    // The admin puts the file back and replays the dead sync.
    std::fs::write(&file, &csv).expect("the admin fixes the cause");
    let replay = queues
        .replay_dead_letter(&*w, &tenant, &letter, None)
        .await
        .expect("replay queued");
    let result = job_result(&queues, &replay.run_id).await;
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    let run = result.final_run_id.expect("final run");
    let ledger = w.run(&tenant, &run).await.expect("ledger").expect("run");
    assert_eq!(ledger.trigger, RunTrigger::Replay);
    assert_eq!(ledger.counts.rows_read, exp.rows_read);
    assert_eq!(ledger.counts.inserted, exp.loaded);
    let stored = w
        .dead_letter(&tenant, &letter)
        .await
        .expect("read")
        .expect("still there");
    assert_eq!(stored.replay_run.as_deref(), Some(replay.run_id.as_str()));

    // Once only, whoever asks.
    let again = queues
        .replay_dead_letter(&*w, &tenant, &letter, None)
        .await
        .expect_err("a second replay is refused");
    assert_eq!(again.kind(), sluice_workers::WorkerErrorKind::Conflict);
    assert!(again.to_string().contains("already replayed"), "{again}");
    let missing = queues
        .replay_dead_letter(&*w, &tenant, "no-such-letter", None)
        .await
        .expect_err("no such letter");
    assert_eq!(missing.kind(), sluice_workers::WorkerErrorKind::NotFound);

    stop_workers(workers).await;
}

/// Processes starting together on a new data directory each set up the embedded queue;
/// its migrations once failed the later ones on `_sqlx_migrations` (seen when `sluice
/// serve` and `sluice trigger` started at the same moment). Separate processes, as in use.
#[test]
fn processes_starting_together_on_a_new_data_directory_all_set_up_the_queue() {
    for round in 0..3 {
        let dir = tempfile::tempdir().expect("tmp");
        let children: Vec<Child> = (0..6)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_sluice"))
                    .arg("--data-dir")
                    .arg(dir.path())
                    .env_remove("SLUICE_REDIS_URL")
                    .env_remove("SLUICE_DATABASE_URL")
                    .arg("trigger")
                    .arg(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/examples/invoices.toml"
                    ))
                    .arg("--json")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("sluice")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
