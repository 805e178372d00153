//! Queue throughput, end to end: no-op sync jobs (pipelines whose CSV holds only a header)
//! through Redis with pipeline locks, run by two `sluice worker` processes into PostgreSQL,
//! against `redis-benchmark` on the same machine in the same run; and the scheduler's time
//! to enqueue 10,000 pipelines due on the same tick.
//!
//! `cargo bench --bench queue_e2e` (needs PostgreSQL and Redis, as the tests do; set
//! SLUICE_BENCH_JOBS / SLUICE_BENCH_PIPELINES to change the sizes).

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use sluice_engine::RunTrigger;
use sluice_engine::TenantSlug;
use sluice_engine::control::PipelineStore;
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_workers::coord::RedisLocks;
use sluice_workers::scheduler::{Scheduler, SchedulerOptions};
use sluice_workers::{QueueSettings, Queues, TriggerOutcome, TriggerRequest};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

const MASTER: &str = "4f6e6520737472696e6720746f2072756c65207468656d20616c6c2c206f6e65";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn spec(name: &str, csv: &str, cron: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "name": name, "tenant": "bench", "entity": "invoices",
        "source": { "kind": "csv", "path": csv },
    });
    if let Some(c) = cron {
        v["schedule"] = serde_json::json!({ "cron": c });
    }
    v
}

fn worker(db: &str, redis: &str, prefix: &str, data: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(data)
        .args([
            "--database-url",
            db,
            "--redis-url",
            redis,
            "--queue-prefix",
            prefix,
        ])
        .args(["worker", "--concurrency", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker")
}

fn redis_benchmark_sets_per_second() -> Option<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-q", "-n", "100000", "-c", "2", "-t", "set", "--csv"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps",...  then  "SET","123456.79",...
    let line = text.lines().find(|l| l.starts_with("\"SET\""))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

#[tokio::main]
async fn main() {
    let admin = env_or(
        "SLUICE_BENCH_PG_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let redis = env_or("SLUICE_BENCH_REDIS_URL", "redis://127.0.0.1:6379");
    let jobs: usize = env_or("SLUICE_BENCH_JOBS", "2000").parse().expect("number");
    let pipelines: usize = env_or("SLUICE_BENCH_PIPELINES", "10000")
        .parse()
        .expect("number");

    let name = format!("sluice_bench_{}", uuid::Uuid::now_v7().simple());
    let mut conn = PgConnection::connect(&admin).await.expect("PostgreSQL");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    let db = format!("{}/{name}", admin.rsplit_once('/').expect("url").0);
    let master = MasterKey::from_hex(MASTER).expect("key");
    let w = PostgresWarehouse::connect(&db).await.expect("connect");
    let tenant = TenantSlug::parse("bench").expect("slug");
    w.create_tenant(&tenant, "Bench", &master)
        .await
        .expect("tenant");
    let dir = tempfile::tempdir().expect("tmp");
    let csv = dir.path().join("empty.csv");
    std::fs::write(
        &csv,
        "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at\n",
    )
    .expect("csv");
    let csv = csv.to_string_lossy().into_owned();
    let prefix = format!("sluice-bench-{}", uuid::Uuid::now_v7().simple());
    let mut settings = QueueSettings::new(Some(redis.clone()), dir.path().join("data"));
    settings.prefix = prefix.clone();
    let queues = Arc::new(Queues::connect(settings).await.expect("Redis"));

    // A: no-op sync jobs, two worker processes.
    for i in 0..jobs {
        w.save_pipeline(
            &tenant,
            &format!("noop-{i}"),
            &spec(&format!("noop-{i}"), &csv, None),
            &serde_json::Map::new(),
            &sluice_engine::control::PipelineChange::shell_register(serde_json::json!({})),
        )
        .await
        .expect("register");
    }
    let started = Instant::now();
    let mut runs = HashSet::new();
    for i in 0..jobs {
        let t = queues
            .trigger(&TriggerRequest {
                tenant: "bench".into(),
                pipeline: format!("noop-{i}"),
                trigger: RunTrigger::Api,
                idempotency_key: None,
                correlation_id: None,
                file: None,
            })
            .await
            .expect("trigger");
        assert_eq!(t.outcome, TriggerOutcome::Enqueued);
        runs.insert(t.run_id);
    }
    let trigger_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut workers = vec![
        worker(&db, &redis, &prefix, &dir.path().join("data")),
        worker(&db, &redis, &prefix, &dir.path().join("data")),
    ];
    while !runs.is_empty() {
        let mut done = Vec::new();
        for r in &runs {
            if let Some(result) = queues.coordinator().result(r).await.expect("result") {
                assert!(result.contains("succeeded"), "{result}");
                done.push(r.clone());
            }
        }
        for r in done {
            runs.remove(&r);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job_secs = started.elapsed().as_secs_f64();
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let jobs_per_sec = jobs as f64 / job_secs;
    println!(
        "no-op sync jobs: {jobs} triggered in {trigger_secs:.2} s ({:.0} triggers/s); run by 2 workers in {job_secs:.2} s = {jobs_per_sec:.1} jobs/s",
        jobs as f64 / trigger_secs
    );
    match redis_benchmark_sets_per_second() {
        Some(sets) => println!(
            "redis-benchmark SET, 2 clients: {sets:.0} ops/s; jobs/s / SET ops/s = {:.5} ({:.0} SETs per job)",
            jobs_per_sec / sets,
            sets / jobs_per_sec
        ),
        None => println!("redis-benchmark not available: no baseline"),
    }

    // B: 10,000 pipelines due on the same tick.
    for i in 0..pipelines {
        w.save_pipeline(
            &tenant,
            &format!("cron-{i}"),
            &spec(&format!("cron-{i}"), &csv, Some("0 */10 * * * *")),
            &serde_json::Map::new(),
            &sluice_engine::control::PipelineChange::shell_register(serde_json::json!({})),
        )
        .await
        .expect("register");
    }
    let mut scheduler = Scheduler::new(Arc::new(w), queues.clone(), SchedulerOptions::default());
    let t0 = Utc.timestamp_opt(1_800_000_000, 0).single().expect("t0");
    let started = Instant::now();
    let (fired, _) = scheduler.pass(t0).await.expect("first pass");
    let first_secs = started.elapsed().as_secs_f64();
    assert_eq!(fired, 0);
    let started = Instant::now();
    let (fired, _) = scheduler
        .pass(t0 + chrono::Duration::minutes(10))
        .await
        .expect("tick");
    let tick_secs = started.elapsed().as_secs_f64();
    println!(
        "scheduler: first pass over {pipelines} schedules {first_secs:.2} s; {fired} pipelines due on one tick enqueued in {tick_secs:.2} s ({:.0} per s)",
        fired as f64 / tick_secs
    );

    if let Ok(l) = RedisLocks::connect(&redis, &prefix).await {
        let _ = l.clear_prefix().await;
    }
    drop(queues);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .expect("drop database");
}
