//! Webhook deliveries end to end: endpoints stored with sealed secrets, events recorded
//! when jobs end, delivered through the queue under the retry policy to a receiver in the
//! test that verifies every signature, answers 500 now and then, and counts every event
//! once by its id. Real PostgreSQL and Redis, and the embedded warehouse and queue.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use sluice_connectors::egress::EgressPolicy;
use sluice_engine::control::webhooks::{EventType, WebhookSecret, verify};
use sluice_engine::control::{
    DeliveryStatus, KeyRotation, NewWebhookEndpoint, WebhookEvent, WebhookStore,
};
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::{SqliteWarehouse, Warehouse};
use sluice_pipelines::Confinement;
use sluice_workers::retry::RetryPolicy;
use sluice_workers::webhooks::{WebhookJob, deliver};
use sluice_workers::worker::{WorkerEnv, WorkerOptions};
use sluice_workers::{JobStatus, Queues};
use support::jobs::*;
use support::messy_invoices;
use support::pg::TestDb;
use support::redis::Prefix;

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Requests in all (every third is answered 500).
    requests: usize,
    /// Requests whose signature did not verify (answered 401).
    forged: usize,
    /// Accepted deliveries by webhook-id: how often each came, and its body.
    accepted: BTreeMap<String, (usize, serde_json::Value)>,
}

#[derive(Clone)]
struct Receiver {
    secret: Arc<Mutex<Option<WebhookSecret>>>,
    seen: Arc<Mutex<Seen>>,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let secret = r.secret.lock().expect("lock").clone().expect("secret set");
    let id = header("webhook-id");
    let verified = verify(
        &secret,
        &id,
        &header("webhook-timestamp"),
        &header("webhook-signature"),
        &body,
        chrono::Utc::now().timestamp(),
    );
    let mut seen = r.seen.lock().expect("lock");
    seen.requests += 1;
    if verified.is_err() {
        seen.forged += 1;
        return StatusCode::UNAUTHORIZED;
    }
    // Now and then the receiver is down: the delivery must come again.
    if seen.requests % 3 == 0 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let value: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
    let entry = seen.accepted.entry(id).or_insert((0, value));
    entry.0 += 1;
    StatusCode::NO_CONTENT
}

async fn receiver() -> (String, Receiver, tokio::task::JoinHandle<()>) {
    let r = Receiver {
        secret: Arc::new(Mutex::new(None)),
        seen: Arc::new(Mutex::new(Seen::default())),
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r.clone());
    let (url, server) = support::serve(app).await;
    (format!("{url}/hook"), r, server)
}

/// A PostgreSQL warehouse and a Redis queue, each the test's own (keep the last two alive).
async fn postgres_and_redis(dir: &Path) -> (Arc<PostgresWarehouse>, Arc<Queues>, TestDb, Prefix) {
    let db = TestDb::create().await;
    let redis = Prefix::new();
    let w = Arc::new(acme_warehouse(&db.url).await);
    let queues = Queues::connect(settings(
        Some((&redis.url, &redis.prefix)),
        &dir.join("data"),
    ))
    .await
    .expect("queues");
    (w, Arc::new(queues), db, redis)
}

/// The embedded warehouse and queue under `dir/data`.
async fn embedded(dir: &Path) -> (Arc<SqliteWarehouse>, Arc<Queues>) {
    let data = dir.join("data");
    let w = SqliteWarehouse::new(&data).with_master_key(master());
    let queues = Queues::connect(settings(None, &data))
        .await
        .expect("queues");
    (Arc::new(w), Arc::new(queues))
}

/// The server's confinement, opened to the receiver on this machine.
fn opened_to_loopback(dir: &Path) -> Confinement {
    Confinement::new(
        None,
        &dir.join("uploads"),
        EgressPolicy::allowing("127.0.0.1").expect("policy"),
    )
    .expect("confinement")
}

/// `(type, subject)` of an accepted body: the run id, or the dead letter's id.
fn event_of(body: &serde_json::Value) -> (String, String) {
    let data = &body["data"];
    let subject = data["run_id"]
        .as_str()
        .or_else(|| data["id"].as_str())
        .expect("a subject")
        .to_string();
    (body["type"].as_str().expect("type").to_string(), subject)
}

/// Syncs that succeed, quarantine and die, and a replay: every event they make reaches
/// the receiver once by id, however often it answered 500.
async fn every_event_arrives_once<W>(w: Arc<W>, queues: Arc<Queues>, dir: &Path)
where
    W: Warehouse + sluice_engine::control::PipelineStore + WebhookStore + KeyRotation + 'static,
{
    let tenant = slug("acme");
    let (url, receiver, server) = receiver().await;
    let (endpoint, secret) = w
        .create_webhook(
            &tenant,
            &NewWebhookEndpoint {
                url: url.clone(),
                events: EventType::ALL.to_vec(),
                quarantine_threshold: 5,
                description: "ops alerts".into(),
            },
        )
        .await
        .expect("endpoint");
    *receiver.secret.lock().expect("lock") = Some(secret.clone());
    // Listed without its secret; signing reads it back sealed and opened.
    let listed = w.webhooks(&tenant).await.expect("list");
    assert_eq!(listed, vec![endpoint.clone()]);
    let (_, opened) = w
        .webhook_signing(&tenant, &endpoint.id)
        .await
        .expect("read")
        .expect("endpoint");
    assert_eq!(opened, secret);
    // A tenant key rotation re-seals it: still the same secret.
    assert!(w.rotate_tenant_key(&tenant).await.expect("rotate") >= 1);
    let (_, opened) = w
        .webhook_signing(&tenant, &endpoint.id)
        .await
        .expect("read")
        .expect("endpoint");
    assert_eq!(opened, secret);

    let (clean, _) = messy_invoices(0, 1);
    let clean = format!(
        "{clean}{}",
        (1..=20)
            .map(|i| format!("C-{i},N-{i},CU-1,Acme Ltd,2026-01-{i:02},2026-02-01,EUR,100.00,100.00,open,invoice,2026-01-{i:02}T00:00:00Z\n"))
            .collect::<String>()
    );
    let (messy, exp) = messy_invoices(300, 7);
    assert!(
        exp.quarantined > 5,
        "the messy file sets aside over the threshold"
    );
    for (name, csv) in [
        ("clean", clean.as_str()),
        ("messy", messy.as_str()),
        ("gone", ""),
    ] {
        let spec = write_pipeline(dir, name, csv, 100, None);
        register(&*w, &spec).await;
    }
    std::fs::remove_file(dir.join("gone.csv")).expect("the file goes missing");

    let env = Arc::new(WorkerEnv::new(
        w.clone(),
        queues.clone(),
        RetryPolicy::with_base(Duration::from_millis(20)),
        opened_to_loopback(dir),
    ));
    let workers = start_workers(env, WorkerOptions::default());

    let mut expected = BTreeSet::new();
    for name in ["clean", "messy", "gone"] {
        let run = queues.trigger(&manual(name)).await.expect("trigger");
        let result = job_result(&queues, &run.run_id).await;
        let last = result.final_run_id.clone().expect("a run");
        match result.status {
            JobStatus::Succeeded => {
                expected.insert(("run.succeeded".to_string(), last.clone()));
                let ledger = w.run(&tenant, &last).await.expect("read").expect("run");
                if ledger.counts.quarantined > 5 {
                    expected.insert(("run.quarantined".to_string(), last));
                }
            }
            JobStatus::Dead => {
                expected.insert(("run.failed".to_string(), last));
                let letter = result.dead_letter.expect("a dead letter");
                expected.insert(("dead_letter.created".to_string(), letter));
            }
        }
    }
    // The messy pipeline's rows are replayed (they fail again: nothing was fixed).
    let replay = queues
        .replay(
            "acme",
            sluice_workers::jobs::ReplaySelection {
                pipeline: "messy".into(),
                ids: vec![],
                run_id: None,
                rule: None,
            },
            None,
        )
        .await
        .expect("replay");
    let result = job_result(&queues, &replay.run_id).await;
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    let last = result.final_run_id.expect("a run");
    expected.insert(("quarantine.replayed".to_string(), last.clone()));
    expected.insert(("run.quarantined".to_string(), last));
    let kinds: BTreeSet<&str> = expected.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(kinds.len(), 5, "every event type happened: {expected:?}");

    eventually(Duration::from_secs(60), "every event delivered", || async {
        let seen = receiver.seen.lock().expect("lock");
        seen.accepted.len() >= expected.len()
    })
    .await;
    // Nothing more is on its way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = {
        let seen = receiver.seen.lock().expect("lock");
        assert_eq!(seen.forged, 0, "every signature verifies");
        let got: BTreeSet<(String, String)> = seen
            .accepted
            .values()
            .map(|(_, body)| event_of(body))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(
            seen.accepted.len(),
            expected.len(),
            "one id per event: {:?}",
            seen.accepted.keys()
        );
        // Delivery is at least once (a job delivered twice may send twice): the receiver
        // counts each event once by its id, as the specification tells receivers to, and
        // the ids above are exactly the events.
        assert!(seen.requests > expected.len(), "some answers were 500s");
        seen.requests
    };

    // The store kept every attempt and its answer.
    let deliveries = w
        .webhook_deliveries(&tenant, &endpoint.id, None, 100)
        .await
        .expect("deliveries");
    assert_eq!(deliveries.len(), expected.len());
    let mut attempts = 0;
    for d in &deliveries {
        assert_eq!(d.status, DeliveryStatus::Delivered, "{d:?}");
        let log = w.delivery_attempts(&tenant, &d.id).await.expect("attempts");
        assert_eq!(log.len() as u32, d.attempts);
        assert!(log.last().expect("an attempt").succeeded());
        assert!(
            log[..log.len() - 1]
                .iter()
                .all(|a| a.status_code == Some(500))
        );
        attempts += log.len();
    }
    assert_eq!(attempts, requests, "every request is logged as an attempt");

    // The same event recorded again (a job delivered twice) delivers nothing new.
    let (kind, subject) = expected.iter().next().expect("an event").clone();
    let again = WebhookEvent::new(
        EventType::parse(&kind).expect("type"),
        &subject,
        serde_json::json!({}),
    );
    let pending = queues
        .emit(&*w, &tenant, &again, "again")
        .await
        .expect("emit");
    assert!(pending.is_empty(), "{pending:?}");

    // A test send after a rotation is signed with the new secret.
    let rotated = w
        .rotate_webhook_secret(&tenant, &endpoint.id)
        .await
        .expect("rotate")
        .expect("endpoint");
    assert_ne!(rotated, secret);
    *receiver.secret.lock().expect("lock") = Some(rotated);
    let mut test = WebhookEvent::new(
        EventType::WebhookTest,
        "t-1",
        serde_json::json!({"id": "t-1"}),
    );
    test.only_endpoint = Some(endpoint.id.clone());
    let ids = queues
        .emit(&*w, &tenant, &test, "test")
        .await
        .expect("test send");
    assert_eq!(ids.len(), 1);
    eventually(Duration::from_secs(30), "the test send", || async {
        receiver
            .seen
            .lock()
            .expect("lock")
            .accepted
            .contains_key(&ids[0])
    })
    .await;
    assert_eq!(receiver.seen.lock().expect("lock").forged, 0);

    stop_workers(workers).await;
    server.abort();
}

#[tokio::test]
async fn every_event_arrives_once_through_redis_into_postgres() {
    let dir = tempfile::tempdir().expect("tmp");
    let (w, queues, _db, _redis) = postgres_and_redis(dir.path()).await;
    every_event_arrives_once(w, queues, dir.path()).await;
}

#[tokio::test]
async fn every_event_arrives_once_in_the_embedded_default() {
    let dir = tempfile::tempdir().expect("tmp");
    let (w, queues) = embedded(dir.path()).await;
    every_event_arrives_once(w, queues, dir.path()).await;
}

/// An endpoint on this machine is refused by the default egress policy at send time (it
/// may have been saved under a wider one): the delivery fails at once, saying why, and
/// nothing is sent.
#[tokio::test]
async fn the_egress_policy_keeps_deliveries_off_the_servers_network() {
    let dir = tempfile::tempdir().expect("tmp");
    let w = SqliteWarehouse::new(dir.path()).with_master_key(master());
    let tenant = slug("acme");
    let (url, receiver, server) = receiver().await;
    let (endpoint, secret) = w
        .create_webhook(
            &tenant,
            &NewWebhookEndpoint {
                url,
                events: vec![EventType::RunFailed],
                quarantine_threshold: 0,
                description: String::new(),
            },
        )
        .await
        .expect("endpoint");
    *receiver.secret.lock().expect("lock") = Some(secret);
    let event = WebhookEvent::new(EventType::RunFailed, "r-1", serde_json::json!({}));
    let ids = w
        .record_webhook_event(&tenant, &event)
        .await
        .expect("record");
    assert_eq!(ids, vec![event.delivery_id(&endpoint.id)]);
    let job = WebhookJob {
        tenant: "acme".into(),
        delivery_id: ids[0].clone(),
        correlation_id: "c".into(),
    };
    let status = deliver(
        &w,
        &EgressPolicy::default(),
        &RetryPolicy::with_base(Duration::from_millis(1)),
        &job,
    )
    .await
    .expect("deliver");
    assert_eq!(status, DeliveryStatus::Failed);
    let log = w.delivery_attempts(&tenant, &ids[0]).await.expect("log");
    assert_eq!(log.len(), 1, "not retried: {log:?}");
    assert!(log[0].response.contains("may not reach"), "{log:?}");
    assert_eq!(receiver.seen.lock().expect("lock").requests, 0);

    // Replayed under a policy that opens the address, it is delivered.
    assert!(w.reopen_delivery(&tenant, &ids[0]).await.expect("reopen"));
    let status = deliver(
        &w,
        &EgressPolicy::allowing("127.0.0.1").expect("policy"),
        &RetryPolicy::with_base(Duration::from_millis(1)),
        &job,
    )
    .await
    .expect("deliver");
    assert_eq!(status, DeliveryStatus::Delivered);
    let d = w
        .webhook_delivery(&tenant, &ids[0])
        .await
        .expect("read")
        .expect("delivery");
    assert_eq!(d.status, DeliveryStatus::Delivered);
    assert_eq!(
        w.delivery_attempts(&tenant, &ids[0])
            .await
            .expect("log")
            .len() as u32,
        d.attempts
    );
    server.abort();
}

/// A process that recorded an event and died before queueing its delivery loses nothing:
/// the sweep finds the pending delivery once it has been untouched long enough, queues it,
/// and a worker delivers it; a delivery still being worked on is left alone.
async fn a_lost_delivery_is_swept_up<W>(w: Arc<W>, queues: Arc<Queues>, dir: &Path)
where
    W: Warehouse + sluice_engine::control::PipelineStore + WebhookStore + 'static,
{
    let tenant = slug("acme");
    let (url, receiver, server) = receiver().await;
    let (endpoint, secret) = w
        .create_webhook(
            &tenant,
            &NewWebhookEndpoint {
                url,
                events: vec![EventType::DeadLetterCreated],
                quarantine_threshold: 0,
                description: String::new(),
            },
        )
        .await
        .expect("endpoint");
    *receiver.secret.lock().expect("lock") = Some(secret);
    // Recorded, never queued (the process died here).
    let event = WebhookEvent::new(
        EventType::DeadLetterCreated,
        "dl-1",
        serde_json::json!({"id": "dl-1"}),
    );
    let ids = w
        .record_webhook_event(&tenant, &event)
        .await
        .expect("record");
    assert_eq!(ids, vec![event.delivery_id(&endpoint.id)]);
    assert_eq!(
        queues
            .sweep_deliveries(&*w, Duration::from_secs(300))
            .await
            .expect("sweep"),
        0,
        "a fresh delivery may still be on its way"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        queues
            .sweep_deliveries(&*w, Duration::from_millis(10))
            .await
            .expect("sweep"),
        1
    );
    // Touched by the sweep: the next one leaves it to the job just queued.
    assert_eq!(
        queues
            .sweep_deliveries(&*w, Duration::from_secs(1))
            .await
            .expect("sweep"),
        0
    );
    let env = Arc::new(WorkerEnv::new(
        w.clone(),
        queues.clone(),
        RetryPolicy::with_base(Duration::from_millis(20)),
        opened_to_loopback(dir),
    ));
    let workers = start_workers(env, WorkerOptions::default());
    eventually(Duration::from_secs(30), "the swept delivery", || async {
        receiver
            .seen
            .lock()
            .expect("lock")
            .accepted
            .contains_key(&ids[0])
    })
    .await;
    let d = w
        .webhook_delivery(&tenant, &ids[0])
        .await
        .expect("read")
        .expect("delivery");
    assert_eq!(d.status, DeliveryStatus::Delivered);
    stop_workers(workers).await;
    server.abort();
}

#[tokio::test]
async fn a_delivery_whose_job_was_never_queued_is_swept_up_in_the_embedded_default() {
    let dir = tempfile::tempdir().expect("tmp");
    let (w, queues) = embedded(dir.path()).await;
    a_lost_delivery_is_swept_up(w, queues, dir.path()).await;
}

#[tokio::test]
async fn a_delivery_whose_job_was_never_queued_is_swept_up_through_redis_into_postgres() {
    let dir = tempfile::tempdir().expect("tmp");
    let (w, queues, _db, _redis) = postgres_and_redis(dir.path()).await;
    a_lost_delivery_is_swept_up(w, queues, dir.path()).await;
}
