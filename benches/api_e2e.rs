//! The HTTP API under load, on PostgreSQL and Redis: the sync trigger endpoint
//! (`POST /v1/pipelines/{name}/sync`) and the quarantine list on 1M quarantined rows,
//! driven by a small keep-alive HTTP/1.1 load generator in this process (so the figures
//! include request parsing, auth, JSON and the network stack, not a client library's cost).
//!
//! `cargo bench --bench api_e2e` (needs PostgreSQL and Redis; SLUICE_BENCH_REQUESTS,
//! SLUICE_BENCH_QUARANTINED change the sizes). Per-key rate limiting is lifted for the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_api::AppState;
use sluice_api::rate_limit::RateLimit;
use sluice_engine::TenantSlug;
use sluice_engine::control::{AccessStore, NewApiKey, PipelineStore, Role};
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_pipelines::{PipelineSource, PipelineSpec, Quiet, RunOptions, run_pipeline};
use sluice_workers::coord::RedisLocks;
use sluice_workers::{QueueSettings, Queues};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const MASTER: &str = "4f6e6520737472696e6720746f2072756c65207468656d20616c6c2c206f6e65";
const HEADER: &str = "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at\n";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Sends `requests` (method, path) over `connections` keep-alive connections; returns each
/// request's latency and the wall time.
async fn load(
    port: u16,
    key: &str,
    requests: Vec<(&'static str, String)>,
    connections: usize,
) -> (Vec<Duration>, Duration) {
    let requests = Arc::new(requests);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (requests, next, key) = (requests.clone(), next.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((method, path)) = requests.get(i) else {
                    break;
                };
                let t = Instant::now();
                let req = format!(
                    "{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\n\r\n"
                );
                write.write_all(req.as_bytes()).await.expect("write");
                let mut status = String::new();
                read.read_line(&mut status).await.expect("status line");
                assert!(
                    status.starts_with("HTTP/1.1 2"),
                    "{method} {path}: {status}"
                );
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    read.read_line(&mut line).await.expect("header");
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().expect("length");
                    }
                }
                let mut body = vec![0; length];
                read.read_exact(&mut body).await.expect("body");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("join"));
    }
    (all, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{what}: {} requests in {:.2} s = {:.0} req/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let admin_url = env_or(
        "SLUICE_BENCH_PG_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let redis = env_or("SLUICE_BENCH_REDIS_URL", "redis://127.0.0.1:6379");
    let requests: usize = env_or("SLUICE_BENCH_REQUESTS", "20000").parse().expect("n");
    let quarantined: usize = env_or("SLUICE_BENCH_QUARANTINED", "1000000")
        .parse()
        .expect("n");

    let name = format!("sluice_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url).await.expect("PostgreSQL");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create database");
    let db = format!("{}/{name}", admin_url.rsplit_once('/').expect("url").0);
    let master = || MasterKey::from_hex(MASTER).expect("key");
    let w = PostgresWarehouse::connect(&db)
        .await
        .expect("connect")
        .with_master_key(master());
    let tenant = TenantSlug::parse("bench").expect("slug");
    w.create_tenant(&tenant, "Bench", &master())
        .await
        .expect("tenant");
    let key = NewApiKey::generate(Some(&tenant), Role::Admin, None).expect("key");
    w.create_key(&key.record).await.expect("key");
    let dir = tempfile::tempdir().expect("tmp");
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, HEADER).expect("csv");
    for i in 0..1000 {
        let spec = serde_json::json!({ "name": format!("p{i}"), "tenant": "bench",
            "entity": "invoices", "source": { "kind": "csv", "path": empty } });
        w.save_pipeline(
            &tenant,
            &format!("p{i}"),
            &spec,
            &serde_json::Map::new(),
            &sluice_engine::control::PipelineChange::shell_register(serde_json::json!({})),
        )
        .await
        .expect("pipeline");
    }
    let w = Arc::new(w);
    let prefix = format!("sluice-bench-{}", uuid::Uuid::now_v7().simple());
    let mut settings = QueueSettings::new(Some(redis.clone()), dir.path().join("data"));
    settings.prefix = prefix.clone();
    let queues = Arc::new(Queues::connect(settings).await.expect("Redis"));
    let confinement = sluice_pipelines::Confinement::new(
        None,
        &dir.path().join("uploads"),
        sluice_connectors::egress::EgressPolicy::default(),
    )
    .expect("confinement");
    let mut state = AppState::new(w.clone(), queues, confinement);
    state.rate = RateLimit {
        burst: 1e12,
        per_second: 1e12,
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sluice_api::serve(
        Arc::new(state),
        ([127, 0, 0, 1], port).into(),
        async move {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The trigger endpoint: the first request per pipeline queues a run, the rest join it.
    let trig: Vec<(&str, String)> = (0..requests)
        .map(|i| ("POST", format!("/v1/pipelines/p{}/sync", i % 1000)))
        .collect();
    let (lat, wall) = load(port, &key.secret, trig, 16).await;
    report("POST /v1/pipelines/{name}/sync, 16 connections", lat, wall);
    let health: Vec<(&str, String)> = (0..requests)
        .map(|_| ("GET", "/health".to_string()))
        .collect();
    let (lat, wall) = load(port, &key.secret, health, 16).await;
    report(
        "GET /health (no auth, no database), 16 connections",
        lat,
        wall,
    );

    // 1M quarantined rows: every record has a bad currency.
    let bad = dir.path().join("bad.csv");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&bad).expect("csv"));
        f.write_all(HEADER.as_bytes()).expect("write");
        for i in 0..quarantined {
            writeln!(
                f,
                "B-{i},{i},C-{},Customer {},2024-01-01,2024-02-01,XX{},100.00,100.00,open,invoice,2024-01-01T00:00:00Z",
                i % 97,
                i % 97,
                i % 7
            )
            .expect("write");
        }
    }
    let spec = PipelineSpec::from_toml(&format!(
        "name = \"bad\"\ntenant = \"bench\"\nentity = \"invoices\"\n[source]\nkind = \"csv\"\npath = \"{}\"\n",
        bad.display()
    ))
    .expect("spec");
    let t = Instant::now();
    let report_run = run_pipeline(
        &spec,
        &PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        &*w,
        &RunOptions::default(),
        &Quiet,
    )
    .await
    .expect("load");
    println!(
        "loaded {} quarantined rows in {:.1} s",
        report_run.ledger.counts.quarantined,
        t.elapsed().as_secs_f64()
    );
    // Cursors spread over the whole set, for pages deep in it.
    let mut conn = PgConnection::connect(&db).await.expect("connect");
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM tenant_bench.quarantine WHERE seq % 5000 = 0 ORDER BY seq",
    )
    .fetch_all(&mut conn)
    .await
    .expect("ids");
    let list: Vec<(&str, String)> = (0..2000)
        .map(|i| match i % 4 {
            0 => ("GET", "/v1/quarantine?limit=100".to_string()),
            1 => (
                "GET",
                format!("/v1/quarantine?limit=100&cursor={}", ids[i % ids.len()]),
            ),
            2 => (
                "GET",
                format!(
                    "/v1/quarantine?limit=100&status=pending&cursor={}",
                    ids[(i * 7) % ids.len()]
                ),
            ),
            _ => (
                "GET",
                format!(
                    "/v1/quarantine?limit=100&rule=currency_code&cursor={}",
                    ids[(i * 13) % ids.len()]
                ),
            ),
        })
        .collect();
    let (lat, wall) = load(port, &key.secret, list, 4).await;
    report(
        &format!(
            "GET /v1/quarantine (100 rows a page, first and deep pages, status/rule filters) on {quarantined} rows, 4 connections"
        ),
        lat,
        wall,
    );

    let _ = stop.send(());
    let _ = server.await;
    if let Ok(l) = RedisLocks::connect(&redis, &prefix).await {
        let _ = l.clear_prefix().await;
    }
    drop(conn);
    drop(w);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop database");
}
