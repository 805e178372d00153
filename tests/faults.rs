//! The fault matrix: each fault injected mid-run with real processes, then proof by row
//! counts and per-currency sums that nothing was lost or loaded twice, that the job's
//! accounting balances over its attempts, and that the user was told what happened.
//!
//! | fault | test |
//! |---|---|
//! | the warehouse PostgreSQL crashes and restarts mid-run | `the_warehouse_postgres_crashing_mid_run_loses_nothing` |
//! | the source PostgreSQL crashes and restarts mid-read | `a_source_postgres_crashing_mid_read_loses_nothing` |
//! | the source MariaDB is killed and restarted mid-read | `a_source_mariadb_crashing_mid_read_loses_nothing` |
//! | the source connection stalls (no reset, no data) | `a_source_connection_that_stalls_is_given_up_and_the_job_resumes` |
//! | `kill -9` of a worker mid-batch of a replay job | `a_worker_killed_mid_replay_batch_is_taken_over_and_each_row_replays_once` |
//! | two schedulers and three workers, one of each killed | `schedulers_and_workers_killed_leave_every_cron_tick_run_once` |
//! | Redis restarted with jobs queued, running and scheduled | `a_redis_restart_with_jobs_queued_running_and_scheduled_loses_none` |
//! | the SQLite warehouse is full (`max_page_count`) | `a_full_sqlite_warehouse_keeps_what_it_committed_and_the_rerun_finishes` |
//! | the warehouse down as a job starts | `a_warehouse_down_as_a_job_starts_is_waited_for` |
//!
//! Rows covered elsewhere: a worker killed with `kill -9` mid-sync
//! (`queue::a_worker_killed_mid_sync_is_taken_over_and_nothing_is_lost_or_doubled`, and in
//! the embedded queue), SIGTERM (`queue::sigterm_lets_the_running_job_finish_before_the_worker_exits`),
//! Redis restarted under a running job (`queue::a_redis_restart_under_a_running_job_loses_nothing`).

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::{AssertSqlSafe, Connection};

use sluice_engine::RunStatus;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::warehouse::{DeadLetterStore, RunHistory};
use sluice_workers::{JobStatus, Queues};
use support::jobs::*;
use support::messy_invoices;
use support::pg::TestDb;
use support::private::{PrivateMariadb, PrivatePg};
use support::proxy::StallProxy;
use support::redis::{Prefix, PrivateRedis};

/// A private PostgreSQL warehouse (tenant `acme`) fed by one worker process, with a pipeline
/// `invoices` over messy invoices, 500 rows to a batch. Dropped in field order: the worker
/// first, the PostgreSQL server last.
struct PrivateWarehouse {
    _worker: Reaper,
    queues: Queues,
    w: PostgresWarehouse,
    exp: support::Expected,
    _dir: tempfile::TempDir,
    _redis: Prefix,
    pg: PrivatePg,
}

impl PrivateWarehouse {
    async fn start(rows: usize, seed: u64) -> PrivateWarehouse {
        let pg = PrivatePg::start();
        let url = pg.url("postgres");
        let w = acme_warehouse(&url).await;
        let redis = Prefix::new();
        let dir = tempfile::tempdir().expect("tmp");
        let data: PathBuf = dir.path().join("data");
        let (csv, exp) = messy_invoices(rows, seed);
        let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
        register(&w, &spec).await;
        let queues = Queues::connect(settings(Some((&redis.url, &redis.prefix)), &data))
            .await
            .expect("queues");
        let worker = Reaper(vec![sluice_worker(
            &WorkerProcess {
                database_url: Some(url.clone()),
                redis: Some((redis.url.clone(), redis.prefix.clone())),
                retry_base_ms: 1000,
                lease_ms: 3000,
            },
            &data,
        )]);
        PrivateWarehouse {
            _worker: worker,
            queues,
            w,
            exp,
            _dir: dir,
            _redis: redis,
            pg,
        }
    }
}

#[tokio::test]
async fn the_warehouse_postgres_crashing_mid_run_loses_nothing() {
    let PrivateWarehouse {
        pg, w, queues, exp, ..
    } = &PrivateWarehouse::start(40_000, 21).await;

    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    first_batches_committed(w, &run.run_id).await;
    pg.crash();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_again();

    let (result, job) = finished_job(queues, w, &run.run_id, Duration::from_secs(180)).await;
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
    assert_loaded_exactly(w, exp).await;
}

/// The warehouse down as a job is taken: the worker waits for it (the policy's waits) to
/// read the pipeline and its earlier attempts, instead of making the job a dead letter.
#[tokio::test]
async fn a_warehouse_down_as_a_job_starts_is_waited_for() {
    let PrivateWarehouse {
        pg, w, queues, exp, ..
    } = &PrivateWarehouse::start(2_000, 27).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.crash();
    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_again();

    let (result, job) = finished_job(queues, w, &run.run_id, Duration::from_secs(120)).await;
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_eq!(job.whole().status, RunStatus::Succeeded, "{job:?}");
    assert!(
        w.dead_letters(&slug("acme"), 10)
            .await
            .expect("letters")
            .is_empty(),
        "no dead letter"
    );
    assert_loaded_exactly(w, exp).await;
}

const CURRENCIES: [&str; 3] = ["USD", "EUR", "GBP"];

/// `n` invoices as SQL values for `src_invoices`, and their totals per currency.
fn source_rows(n: usize) -> (Vec<String>, HashMap<String, Decimal>) {
    let mut sums: HashMap<String, Decimal> = HashMap::new();
    let rows = (1..=n)
        .map(|i| {
            let currency = CURRENCIES[i % 3];
            let total = Decimal::new(10_000 + (i as i64 * 7919) % 900_000, 2);
            *sums.entry(currency.to_string()).or_default() += total;
            format!(
                "({i}, 'INV-{i:06}', 'C-{}', '2024-04-01', '2024-05-01', '{currency}', {total}, {total}, \
                 '2024-05-01 10:{:02}:{:02}')",
                i % 500,
                (i / 60) % 60,
                i % 60
            )
        })
        .collect();
    (rows, sums)
}

const SOURCE_TABLE: &str = "CREATE TABLE src_invoices (id bigint PRIMARY KEY, external_id varchar(40) NOT NULL, \
    customer_id varchar(40) NOT NULL, issue_date date NOT NULL, due_date date NOT NULL, currency char(3) NOT NULL, \
    total decimal(12,2) NOT NULL, balance decimal(12,2) NOT NULL, updated_at timestamp NOT NULL)";

/// The statements that make `src_invoices` with `n` rows (see [`source_rows`]).
fn source_statements(n: usize) -> Vec<String> {
    let (rows, _) = source_rows(n);
    std::iter::once(SOURCE_TABLE.to_string())
        .chain(
            rows.chunks(2000)
                .map(|c| format!("INSERT INTO src_invoices VALUES {}", c.join(", "))),
        )
        .collect()
}

/// A source database restarted while a worker process reads it: the attempt that lost
/// its connection fails as transient and says so, the next resumes after the last
/// committed batch, and the warehouse ends with every source row once.
async fn source_fault_mid_read<F: std::future::Future<Output = ()>>(
    kind: &str,
    url: &str,
    extra: &str,
    fault: impl FnOnce() -> F,
    rows: usize,
) -> sluice_engine::JobLedger {
    let db = TestDb::create().await;
    let w = acme_warehouse(&db.url).await;
    let redis = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let data: PathBuf = dir.path().join("data");
    let path = dir.path().join("erp.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"invoices\"\ntenant = \"acme\"\nentity = \"invoices\"\nbatch_rows = 250\n\
             [source]\nkind = \"{kind}\"\nurl = \"{url}\"\ntable = \"src_invoices\"\ncursor = [\"updated_at\", \"id\"]\n{extra}"
        ),
    )
    .expect("toml");
    let spec = sluice_pipelines::PipelineSpec::from_file(&path).expect("spec");
    register(&w, &spec).await;
    let queues = Queues::connect(settings(Some((&redis.url, &redis.prefix)), &data))
        .await
        .expect("queues");
    let _workers = Reaper(vec![sluice_worker(
        &WorkerProcess {
            database_url: Some(db.url.clone()),
            redis: Some((redis.url.clone(), redis.prefix.clone())),
            retry_base_ms: 1000,
            lease_ms: 3000,
        },
        &data,
    )]);

    let run = queues.trigger(&manual("invoices")).await.expect("trigger");
    first_batches_committed(&w, &run.run_id).await;
    let before = w
        .run(&slug("acme"), &run.run_id)
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(
        before.status,
        RunStatus::Running,
        "the source must go down while the run reads it"
    );
    fault().await;

    let (result, job) = finished_job(&queues, &w, &run.run_id, Duration::from_secs(180)).await;
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert!(
        job.attempts.len() >= 2,
        "the crash failed an attempt: {job:?}"
    );
    let told = job.attempts[0].error.as_deref().unwrap_or_default();
    assert!(
        told.starts_with("source unavailable"),
        "the failed attempt says why: {job:?}"
    );
    let whole = job.whole();
    assert_eq!(
        whole.counts.rows_read, rows as u64,
        "every source row read once: {job:?}"
    );
    assert_eq!(whole.counts.inserted, rows as u64, "{job:?}");
    let (_, expected) = source_rows(rows);
    assert_eq!(totals(&w).await, (rows, expected));
    job
}

#[tokio::test]
async fn a_source_postgres_crashing_mid_read_loses_nothing() {
    let pg = PrivatePg::start();
    let url = pg.url("postgres");
    let rows = 60_000;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("source");
    for sql in source_statements(rows) {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect("source");
    }
    drop(conn);
    source_fault_mid_read(
        "postgres",
        &url,
        "",
        || async {
            pg.crash();
            std::thread::sleep(Duration::from_secs(2));
            pg.start_again();
        },
        rows,
    )
    .await;
}

#[tokio::test]
async fn a_source_mariadb_crashing_mid_read_loses_nothing() {
    let mut db = PrivateMariadb::start();
    let url = db.url();
    let rows = 60_000;
    let mut conn = sqlx::MySqlConnection::connect(&url).await.expect("source");
    for sql in source_statements(rows) {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect("source");
    }
    drop(conn);
    source_fault_mid_read(
        "mysql",
        &url,
        "",
        || async {
            db.crash();
            std::thread::sleep(Duration::from_secs(2));
            db.start_again();
        },
        rows,
    )
    .await;
}

#[tokio::test]
async fn a_source_connection_that_stalls_is_given_up_and_the_job_resumes() {
    let db = TestDb::create().await;
    let rows = 60_000;
    let mut conn = db.connect().await;
    for sql in source_statements(rows) {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect("source");
    }
    drop(conn);
    // postgres://user@host:port/db
    let (head, rest) = db.url.rsplit_once(':').expect("a port in the URL");
    let (port, name) = rest.split_once('/').expect("a database in the URL");
    let port: u16 = port.parse().expect("port");
    let proxy = StallProxy::start(([127, 0, 0, 1], port).into()).await;
    let through = format!("{head}:{}/{name}", proxy.port);
    let job = source_fault_mid_read(
        "postgres",
        &through,
        "statement_timeout_secs = 1\n",
        || proxy.stall_for(Duration::from_secs(10)),
        rows,
    )
    .await;
    let told = job.attempts[0].error.as_deref().unwrap_or_default();
    assert!(told.contains("stalled"), "{job:?}");
}

#[tokio::test]
async fn a_full_sqlite_warehouse_keeps_what_it_committed_and_the_rerun_finishes() {
    use sluice_engine::SqliteWarehouse;
    use sluice_engine::prelude::*;
    use sluice_pipelines::{PipelineSource, Quiet, RunOptions, SourceReach, run_pipeline};
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let (csv, exp) = messy_invoices(40_000, 23);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
    let source = PipelineSource::from_spec(&spec.source, None, &SourceReach::unrestricted())
        .expect("source");
    // 3 MiB holds the schema and some batches, not the whole file.
    let full = SqliteWarehouse::new(&data).with_size_limit(3 << 20);
    let err = run_pipeline(&spec, &source, &full, &RunOptions::default(), &Quiet)
        .await
        .expect_err("the warehouse fills up");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("full"), "the user is told: {err}");
    let failed = full
        .run(&slug("acme"), err.run_id().expect("run id"))
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(failed.status, RunStatus::Failed);
    let c = &failed.counts;
    assert!(c.rows_read > 0 && c.rows_read < exp.rows_read, "{c:?}");
    assert_eq!(
        c.rows_read,
        c.loaded() + c.quarantined + c.deduplicated,
        "{c:?}"
    );
    let kept = full.invoices(&slug("acme")).await.expect("invoices").len() as u64;
    assert_eq!(kept, c.inserted, "exactly the committed batches are kept");
    drop(full);

    // Space freed: the rerun resumes after the last committed batch.
    let w = SqliteWarehouse::new(&data);
    let rerun = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("rerun");
    assert_eq!(c.rows_read + rerun.ledger.counts.rows_read, exp.rows_read);
    assert_loaded_exactly(&w, &exp).await;
}

#[tokio::test]
async fn a_worker_killed_mid_replay_batch_is_taken_over_and_each_row_replays_once() {
    use sluice_engine::prelude::*;
    use sluice_engine::quarantine::{QuarantineFilter, QuarantineStatus};
    use sluice_workers::jobs::ReplaySelection;
    let db = TestDb::create().await;
    let w = acme_warehouse(&db.url).await;
    let redis = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let data: PathBuf = dir.path().join("data");
    let (csv, exp) = messy_invoices(40_000, 24);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 100, None);
    register(&w, &spec).await;
    let queues = Queues::connect(settings(Some((&redis.url, &redis.prefix)), &data))
        .await
        .expect("queues");
    let process = WorkerProcess {
        database_url: Some(db.url.clone()),
        redis: Some((redis.url.clone(), redis.prefix.clone())),
        retry_base_ms: 100,
        lease_ms: 3000,
    };
    let mut workers = Reaper(vec![sluice_worker(&process, &data)]);
    let sync = queues.trigger(&manual("invoices")).await.expect("trigger");
    let (result, _) = finished_job(&queues, &w, &sync.run_id, Duration::from_secs(120)).await;
    assert_eq!(result.status, JobStatus::Succeeded);

    // Fix every row whose only error is its currency, as an admin's PATCH would.
    let tenant = slug("acme");
    let all = QuarantineFilter {
        limit: Some(100_000),
        ..QuarantineFilter::default()
    };
    let quarantined = w.quarantined(&tenant, &all).await.expect("quarantine");
    let fixable: Vec<String> = quarantined
        .iter()
        .filter(|r| r.errors.len() == 1 && r.errors[0].rule == "currency_code")
        .map(|r| r.id.clone())
        .collect();
    let by_rule = quarantined
        .iter()
        .filter(|r| r.errors.iter().any(|e| e.rule == "currency_code"))
        .count();
    assert!(
        fixable.len() > 200,
        "two pages of rows to replay: {}",
        fixable.len()
    );
    let mut conn = db.connect().await;
    fix_currencies(&mut conn, &fixable).await;
    let before = w.invoices(&tenant).await.expect("invoices").len();

    // Hold the last row of the replay (pages go in quarantine order) so that the replay
    // stops inside a later batch's transaction, after earlier batches committed.
    let last: String = sqlx::query_scalar(
        "SELECT id FROM tenant_acme.quarantine WHERE errors @> '[{\"rule\": \"currency_code\"}]' \
         ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .expect("last row");
    let mut holder = db.connect().await;
    let mut held = sqlx::Connection::begin(&mut holder).await.expect("tx");
    sqlx::query("SELECT id FROM tenant_acme.quarantine WHERE id = $1 FOR UPDATE")
        .bind(&last)
        .execute(&mut *held)
        .await
        .expect("hold the row");
    let replay = queues
        .replay(
            "acme",
            ReplaySelection {
                pipeline: "invoices".into(),
                ids: Vec::new(),
                run_id: None,
                rule: Some("currency_code".into()),
            },
            None,
        )
        .await
        .expect("replay");
    eventually(Duration::from_secs(60), "a replay batch waiting on the held row", || async {
        let committed = w
            .run(&tenant, &replay.run_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|l| l.counts.rows_read > 0);
        let mut c = db.connect().await;
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut c)
        .await
        .expect("activity");
        committed && waiting > 0
    })
    .await;
    kill_9(&mut workers.0[0]);
    held.rollback().await.expect("release the row");
    workers.0.push(sluice_worker(&process, &data));

    let (result, job) = finished_job(&queues, &w, &replay.run_id, Duration::from_secs(120)).await;
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert!(
        job.attempts.len() >= 2,
        "the killed attempt and its takeover: {job:?}"
    );
    let whole = job.whole();
    assert_eq!(
        whole.counts.rows_read, by_rule as u64,
        "each selected row read once: {job:?}"
    );
    assert_eq!(
        whole.counts.quarantined,
        (by_rule - fixable.len()) as u64,
        "{job:?}"
    );
    let after = w.invoices(&tenant).await.expect("invoices").len();
    assert_eq!(
        (after - before) as u64
            + whole.counts.updated
            + whole.counts.unchanged
            + whole.counts.deduplicated,
        fixable.len() as u64
    );
    let now = w.quarantined(&tenant, &all).await.expect("quarantine");
    let replayed = now
        .iter()
        .filter(|r| r.status == QuarantineStatus::Replayed)
        .count();
    assert_eq!(replayed, fixable.len(), "every fixed row replayed, once");
    assert_eq!(
        now.len() as u64,
        exp.quarantined,
        "no row lost from the quarantine"
    );
}

#[tokio::test]
async fn schedulers_and_workers_killed_leave_every_cron_tick_run_once() {
    let db = TestDb::create().await;
    let w = acme_warehouse(&db.url).await;
    let redis = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let data: PathBuf = dir.path().join("data");
    let (csv, exp) = messy_invoices(3_000, 25);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 250, Some("*/2 * * * * *"));
    register(&w, &spec).await;
    let queues = Queues::connect(settings(Some((&redis.url, &redis.prefix)), &data))
        .await
        .expect("queues");
    let process = WorkerProcess {
        database_url: Some(db.url.clone()),
        redis: Some((redis.url.clone(), redis.prefix.clone())),
        retry_base_ms: 200,
        lease_ms: 3000,
    };
    let mut schedulers = Reaper(vec![
        sluice_scheduler(&process, &data),
        sluice_scheduler(&process, &data),
    ]);
    let mut workers = Reaper((0..3).map(|_| sluice_worker(&process, &data)).collect());

    let ticks_fired = || cron_ticks(&redis.url, &redis.prefix, "acme", "invoices");
    eventually(Duration::from_secs(60), "two ticks fired", || async {
        ticks_fired().await.len() >= 2
    })
    .await;
    kill_9(&mut schedulers.0[0]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill_9(&mut workers.0[0]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    kill_9(&mut schedulers.0[1]);
    let ticks = ticks_fired().await;

    // Every tick from the first to the last fired, none lost when a scheduler died.
    assert!(ticks.len() >= 6, "{ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1].0 - pair[0].0,
            2_000,
            "a tick was skipped: {ticks:?}"
        );
    }
    // Each tick has one run, which started after it and succeeded (a run that took over
    // from the killed worker included).
    let mut runs = std::collections::BTreeSet::new();
    for (at, run) in &ticks {
        let (result, job) = finished_job(&queues, &w, run, Duration::from_secs(120)).await;
        assert_eq!(result.status, JobStatus::Succeeded, "tick {at}: {result:?}");
        let whole = job.whole();
        assert!(
            whole.started_at.timestamp_millis() >= *at,
            "tick {at} joined a run that started before it: {whole:?}"
        );
        runs.insert(run.clone());
    }
    // ... and no run came from anything but a tick: no tick fired twice.
    let cron_jobs: std::collections::BTreeSet<String> = w
        .runs(&slug("acme"), Some("invoices"), 1000)
        .await
        .expect("runs")
        .into_iter()
        .map(|r| sluice_engine::JobLedger::job_id(&r.run_id).to_string())
        .collect();
    assert_eq!(
        cron_jobs, runs,
        "runs without a tick, or ticks without their run"
    );
    assert_loaded_exactly(&w, &exp).await;
}

#[tokio::test]
async fn a_redis_restart_with_jobs_queued_running_and_scheduled_loses_none() {
    let db = TestDb::create().await;
    let w = acme_warehouse(&db.url).await;
    let dir = tempfile::tempdir().expect("tmp");
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir).expect("dir");
    let mut redis = PrivateRedis::start(&redis_dir);
    let prefix = "sluice";
    let data: PathBuf = dir.path().join("data");
    let (csv, exp) = messy_invoices(30_000, 26);
    // The same file under three pipelines: one running, one queued behind it (one worker,
    // one job at a time), one on a 2-second schedule.
    for (name, cron) in [
        ("running", None),
        ("queued", None),
        ("scheduled", Some("*/2 * * * * *")),
    ] {
        let spec = write_pipeline(dir.path(), name, &csv, 500, cron);
        register(&w, &spec).await;
    }
    let queues = Queues::connect(settings(Some((&redis.url(), prefix)), &data))
        .await
        .expect("queues");
    let process = WorkerProcess {
        database_url: Some(db.url.clone()),
        redis: Some((redis.url(), prefix.to_string())),
        retry_base_ms: 500,
        lease_ms: 3000,
    };
    let _procs = Reaper(vec![
        sluice_worker(&process, &data),
        sluice_scheduler(&process, &data),
    ]);
    eventually(Duration::from_secs(30), "a scheduled tick", || async {
        !cron_ticks(&redis.url(), prefix, "acme", "scheduled")
            .await
            .is_empty()
    })
    .await;
    let running = queues.trigger(&manual("running")).await.expect("trigger");
    let queued = queues.trigger(&manual("queued")).await.expect("trigger");
    first_batches_committed(&w, &running.run_id).await;
    let before = w
        .run(&slug("acme"), &running.run_id)
        .await
        .expect("ledger")
        .expect("run");
    assert_eq!(
        before.status,
        RunStatus::Running,
        "Redis must stop under a running job"
    );
    redis.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart();

    for run in [&running.run_id, &queued.run_id] {
        let (result, job) = finished_job(&queues, &w, run, Duration::from_secs(180)).await;
        assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
        assert_eq!(job.whole().counts.rows_read, exp.rows_read, "{job:?}");
    }
    // The schedule goes on after the restart, each tick with one run; none fired twice.
    let before = cron_ticks(&redis.url(), prefix, "acme", "scheduled")
        .await
        .len();
    eventually(
        Duration::from_secs(60),
        "ticks after the restart",
        || async {
            cron_ticks(&redis.url(), prefix, "acme", "scheduled")
                .await
                .len()
                >= before + 2
        },
    )
    .await;
    let ticks = cron_ticks(&redis.url(), prefix, "acme", "scheduled").await;
    let mut runs = std::collections::BTreeSet::new();
    for (at, run) in &ticks {
        let (result, _) = finished_job(&queues, &w, run, Duration::from_secs(120)).await;
        assert_eq!(result.status, JobStatus::Succeeded, "tick {at}: {result:?}");
        runs.insert(run.clone());
    }
    let jobs: std::collections::BTreeSet<String> = w
        .runs(&slug("acme"), Some("scheduled"), 1000)
        .await
        .expect("runs")
        .into_iter()
        .map(|r| sluice_engine::JobLedger::job_id(&r.run_id).to_string())
        .collect();
    // Ticks fired since the first reading have runs too: read the keys again.
    let keyed: std::collections::BTreeSet<String> =
        cron_ticks(&redis.url(), prefix, "acme", "scheduled")
            .await
            .into_iter()
            .map(|(_, run)| run)
            .chain(runs)
            .collect();
    assert!(
        jobs.is_subset(&keyed),
        "a run without its tick: {jobs:?} {keyed:?}"
    );
    // Each pipeline keeps its own copy of the file's rows: three times the file, once each.
    let (count, sums) = totals(&w).await;
    assert_eq!(count, 3 * exp.winners.len());
    let thrice: HashMap<String, Decimal> = expected_sums(&exp)
        .into_iter()
        .map(|(c, v)| (c, v * Decimal::from(3)))
        .collect();
    assert_eq!(sums, thrice);
}
