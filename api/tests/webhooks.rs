//! Webhooks through the API, in process on the embedded warehouse and queue, delivering to
//! a receiver on this machine (opened to tenants with `--allow-source-hosts 127.0.0.1`):
//! an endpoint made with its secret shown once, a sync's event delivered after a 500 and
//! logged with both answers, a test send, a rotated secret, a replay with the same id,
//! deletion, another tenant's 404s, and the egress policy on the URL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use sluice_engine::control::Role;
use sluice_engine::control::webhooks::{WebhookSecret, verify};

mod harness;
use harness::*;

/// `(webhook-id, type)` of every verified request, and how many requests came at all.
#[derive(Default)]
struct Inbox {
    secret: Option<WebhookSecret>,
    requests: usize,
    verified: Vec<(String, String)>,
}

async fn receive(
    State(inbox): State<Arc<Mutex<Inbox>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut inbox = inbox.lock().expect("lock");
    inbox.requests += 1;
    let secret = inbox.secret.clone().expect("secret");
    let now = chrono::Utc::now().timestamp();
    let id = h("webhook-id");
    if verify(
        &secret,
        &id,
        &h("webhook-timestamp"),
        &h("webhook-signature"),
        &body,
        now,
    )
    .is_err()
    {
        return StatusCode::UNAUTHORIZED;
    }
    // The first request finds the receiver down.
    if inbox.requests == 1 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let body: Value = serde_json::from_slice(&body).expect("json");
    inbox
        .verified
        .push((id, body["type"].as_str().unwrap_or_default().to_string()));
    StatusCode::OK
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn an_endpoint_is_made_signed_for_tested_rotated_replayed_and_deleted() {
    let api = Api::allowing("127.0.0.1").await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(inbox.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // The cloud metadata address is refused even with loopback opened.
    let refused = api
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&admin),
            Some(json!({ "url": "http://169.254.169.254/latest" })),
        )
        .await;
    assert_problem(&refused, StatusCode::BAD_REQUEST);
    let unknown = api
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&admin),
            Some(json!({ "url": url, "events": ["run.started"] })),
        )
        .await;
    assert_eq!(
        unknown.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        unknown.body
    );

    let made = api
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(&admin),
            Some(json!({ "url": url, "events": ["run.succeeded"], "description": "ops" })),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let secret = made.body["secret"].as_str().expect("secret shown once");
    assert!(secret.starts_with("whsec_"));
    inbox.lock().expect("lock").secret = Some(WebhookSecret::parse(secret).expect("secret"));
    let id = made.body["endpoint"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let listed = api
        .call(Method::GET, "/v1/webhooks", Some(&admin), None)
        .await;
    assert_eq!(listed.body["items"][0]["id"], json!(id));
    assert!(
        !listed.body.to_string().contains(&secret[6..]),
        "the secret never comes back"
    );

    // A sync's run.succeeded, delivered after one 500.
    let worker = api.start_worker().await;
    let created = api
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&admin),
            Some(example_pipeline("inv")),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let sync = api
        .call(Method::POST, "/v1/pipelines/inv/sync", Some(&admin), None)
        .await;
    let run = sync.body["run_id"].as_str().expect("run").to_string();
    finished_run(&api, &admin, &run).await;
    eventually("the run's event", || {
        !inbox.lock().expect("lock").verified.is_empty()
    })
    .await;
    let page = api
        .call(
            Method::GET,
            &format!("/v1/webhooks/{id}/deliveries"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let delivery = page.body["items"][0].clone();
    assert_eq!(delivery["event_type"], "run.succeeded");
    assert_eq!(delivery["payload"]["data"]["run_id"], json!(run));
    let delivery_id = delivery["id"].as_str().expect("id").to_string();
    let detail = api
        .call(
            Method::GET,
            &format!("/v1/webhook-deliveries/{delivery_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        detail.body["delivery"]["status"], "delivered",
        "{}",
        detail.body
    );
    let codes: Vec<Value> = detail.body["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["status_code"].clone())
        .collect();
    assert_eq!(codes, vec![json!(500), json!(200)]);

    // A test send, then a rotation: the next delivery verifies only with the new secret.
    let test = api
        .call(
            Method::POST,
            &format!("/v1/webhooks/{id}/test"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(test.status, StatusCode::ACCEPTED, "{}", test.body);
    eventually("the test send", || {
        inbox
            .lock()
            .expect("lock")
            .verified
            .iter()
            .any(|(_, t)| t == "webhook.test")
    })
    .await;
    let rotated = api
        .call(
            Method::POST,
            &format!("/v1/webhooks/{id}/rotate-secret"),
            Some(&admin),
            None,
        )
        .await;
    let new_secret = rotated.body["secret"].as_str().expect("new secret");
    assert_ne!(new_secret, secret);
    inbox.lock().expect("lock").secret = Some(WebhookSecret::parse(new_secret).expect("secret"));
    let replay = api
        .call(
            Method::POST,
            &format!("/v1/webhook-deliveries/{delivery_id}/replay"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(replay.status, StatusCode::ACCEPTED, "{}", replay.body);
    eventually("the replay, with the same id", || {
        inbox
            .lock()
            .expect("lock")
            .verified
            .iter()
            .filter(|(d, _)| *d == delivery_id)
            .count()
            == 2
    })
    .await;

    // Another tenant sees none of it.
    let other = api.key(Some("globex"), Role::Admin).await;
    for path in [
        format!("/v1/webhooks/{id}"),
        format!("/v1/webhook-deliveries/{delivery_id}"),
        format!("/v1/webhooks/{id}/deliveries"),
    ] {
        assert_problem(
            &api.call(Method::GET, &path, Some(&other), None).await,
            StatusCode::NOT_FOUND,
        );
    }
    assert_problem(
        &api.call(
            Method::POST,
            &format!("/v1/webhook-deliveries/{delivery_id}/replay"),
            Some(&other),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
    );

    let deleted = api
        .call(
            Method::DELETE,
            &format!("/v1/webhooks/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_problem(
        &api.call(
            Method::GET,
            &format!("/v1/webhooks/{id}"),
            Some(&admin),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
    );
    let audit = api.call(Method::GET, "/v1/audit", Some(&admin), None).await;
    let actions: Vec<&str> = audit.body["items"]
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for action in [
        "webhook.create",
        "webhook.rotate_secret",
        "webhook.replay",
        "webhook.delete",
    ] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    worker.stop().await;
    server.abort();
}
