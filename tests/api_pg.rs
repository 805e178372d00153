//! The HTTP API on the production stack: PostgreSQL warehouse (schema per tenant), Redis
//! queue, a worker in this process. Tenants are provisioned with a platform key; each
//! tenant's keys see only their own pipelines, runs and quarantine; a quarantined row is
//! fixed, retried and loaded, and a batch retry accounts for every row.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use sluice_api::{AppState, router};
use sluice_engine::control::{AccessStore, NewApiKey, Role};
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_workers::retry::RetryPolicy;
use sluice_workers::worker::{WorkerEnv, WorkerOptions, run_workers};
use sluice_workers::{QueueSettings, Queues};
use support::messy_invoices;
use support::pg::{MASTER_KEY_HEX, TestDb};
use support::redis::Prefix;
use tower::ServiceExt;

async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"));
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = to_bytes(resp.into_body(), 1 << 22).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn finished(app: &axum::Router, key: &str, run: &str) -> Value {
    for _ in 0..600 {
        let (status, body) = call(app, Method::GET, &format!("/v1/runs/{run}"), key, None).await;
        if status == StatusCode::OK && body["status"] != "running" && body["status"] != "queued" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run} did not end");
}

#[tokio::test]
async fn tenants_quarantine_fix_and_retry_on_postgres_and_redis() {
    let db = TestDb::create().await;
    let redis = Prefix::new();
    let dir = tempfile::tempdir().expect("tmp");
    let master = || MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    let w = PostgresWarehouse::connect(&db.url)
        .await
        .expect("connect")
        .with_master_key(master());
    w.migrate_control().await.expect("control schema");
    let w = Arc::new(w);
    let mut settings = QueueSettings::new(Some(redis.url.clone()), dir.path().join("data"));
    settings.prefix = redis.prefix.clone();
    settings.poll_interval = Duration::from_millis(50);
    let queues = Arc::new(Queues::connect(settings).await.expect("Redis"));
    let confinement = sluice_pipelines::Confinement::new(
        Some(dir.path()),
        &dir.path().join("uploads"),
        sluice_connectors::egress::EgressPolicy::default(),
    )
    .expect("confinement");
    let app = router(Arc::new(AppState::new(
        w.clone(),
        queues.clone(),
        confinement.clone(),
    )));
    let env = Arc::new(WorkerEnv::new(
        w.clone(),
        queues,
        RetryPolicy::with_base(Duration::from_millis(10)),
        confinement,
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(async move {
        run_workers(env, &WorkerOptions::default(), async move {
            let _ = stopped.await;
        })
        .await
    });

    let platform = NewApiKey::generate(None, Role::Platform, None).expect("key");
    w.create_key(&platform.record).await.expect("store key");
    let mut admins = Vec::new();
    for t in ["acme", "globex"] {
        let (s, b) = call(
            &app,
            Method::POST,
            "/v1/tenants",
            &platform.secret,
            Some(json!({ "slug": t })),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (s, b) = call(
            &app,
            Method::POST,
            "/v1/keys",
            &platform.secret,
            Some(json!({ "role": "admin", "tenant": t })),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        admins.push(b["key"].as_str().expect("key").to_string());
    }
    let (acme, globex) = (&admins[0], &admins[1]);

    let (csv, exp) = messy_invoices(3_000, 21);
    let file = dir.path().join("invoices.csv");
    std::fs::write(&file, csv).expect("csv");
    let pipeline = json!({ "name": "invoices", "entity": "invoices", "batch_rows": 1000,
                           "source": { "kind": "csv", "path": file } });
    let (s, b) = call(&app, Method::POST, "/v1/pipelines", acme, Some(pipeline)).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = call(
        &app,
        Method::POST,
        "/v1/pipelines/invoices/sync",
        acme,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let run_id = b["run_id"].as_str().expect("run").to_string();
    let run = finished(&app, acme, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["quarantined"], exp.quarantined);

    // Tenant isolation: globex sees none of it.
    for path in [
        "/v1/pipelines/invoices".to_string(),
        format!("/v1/runs/{run_id}"),
    ] {
        let (s, b) = call(&app, Method::GET, &path, globex, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {b}");
    }
    let (_, rows) = call(&app, Method::GET, "/v1/quarantine?limit=1000", acme, None).await;
    let rows = rows["items"].as_array().expect("items").clone();
    assert_eq!(rows.len() as u64, exp.quarantined);
    let (_, theirs) = call(&app, Method::GET, "/v1/quarantine", globex, None).await;
    assert_eq!(theirs["items"], json!([]));
    let one = rows[0]["id"].as_str().expect("id");
    let (s, _) = call(
        &app,
        Method::GET,
        &format!("/v1/quarantine/{one}"),
        globex,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &app,
        Method::PATCH,
        &format!("/v1/quarantine/{one}"),
        globex,
        Some(json!({ "raw": {} })),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Fix every bad currency (and nothing else wrong with those rows), retry them in one
    // batch: loaded, marked replayed, accounted for.
    let fixable: Vec<&Value> = rows
        .iter()
        .filter(|r| {
            r["errors"]
                .as_array()
                .is_some_and(|e| e.len() == 1 && e[0]["rule"] == "currency_code")
        })
        .collect();
    assert!(!fixable.is_empty());
    let mut ids = Vec::new();
    for r in &fixable {
        let id = r["id"].as_str().expect("id");
        let (s, b) = call(
            &app,
            Method::PATCH,
            &format!("/v1/quarantine/{id}"),
            acme,
            Some(json!({ "raw": { "currency": "EUR" } })),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["status"], "fixed");
        ids.push(id.to_string());
    }
    let (s, b) = call(
        &app,
        Method::POST,
        "/v1/quarantine/retry",
        acme,
        Some(json!({ "ids": ids })),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let replay = finished(&app, acme, b["run_id"].as_str().expect("run")).await;
    assert_eq!(replay["rows_read"], ids.len());
    assert_eq!(replay["quarantined"], 0, "{replay}");
    let (_, stats) = call(&app, Method::GET, "/v1/quarantine/stats", acme, None).await;
    assert_eq!(stats["by_status"]["replayed"], ids.len());
    assert_eq!(
        stats["by_status"]["pending"],
        exp.quarantined - ids.len() as u64
    );

    // The rest, retried by filter unchanged, fail again: counted once each, no copies.
    let (s, b) = call(
        &app,
        Method::POST,
        "/v1/quarantine/retry",
        acme,
        Some(json!({ "pipeline": "invoices" })),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let replay = finished(&app, acme, b["run_id"].as_str().expect("run")).await;
    assert_eq!(replay["rows_read"], exp.quarantined - ids.len() as u64);
    assert_eq!(replay["quarantined"], replay["rows_read"]);
    let (_, after) = call(&app, Method::GET, "/v1/quarantine?limit=1000", acme, None).await;
    assert_eq!(after["items"].as_array().map(Vec::len), Some(rows.len()));

    // Ignore one; the audit log has the fixes and the ignore.
    let pending = after["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|r| r["status"] == "pending")
        .expect("a pending row")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (s, b) = call(
        &app,
        Method::POST,
        &format!("/v1/quarantine/{pending}/ignore"),
        acme,
        Some(json!({ "reason": "test row" })),
    )
    .await;
    assert_eq!((s, b["status"].clone()), (StatusCode::OK, json!("ignored")));
    let (_, audit) = call(&app, Method::GET, "/v1/audit?limit=1000", acme, None).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "quarantine.fix").count(),
        ids.len()
    );
    assert!(actions.contains(&"quarantine.ignore") && actions.contains(&"pipeline.sync"));
    let (_, theirs) = call(&app, Method::GET, "/v1/audit", globex, None).await;
    assert!(
        theirs["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|e| e["tenant"] == "globex")
    );

    let _ = stop.send(());
    worker.await.expect("join").expect("workers");
}
