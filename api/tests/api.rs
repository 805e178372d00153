//! The API in process (tower `oneshot`), on the embedded warehouse and queue: the role
//! matrix, tenant isolation, problem documents with correlation ids, syncs that join and
//! honour idempotency keys, pipelines whose secrets never come back, keys and the audit log.

use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use sluice_engine::control::Role;
use tower::ServiceExt;

mod harness;
use harness::*;

#[tokio::test]
async fn every_route_allows_exactly_the_roles_it_should() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let created = api
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&admin),
            Some(pipeline("inv", &example_csv())),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);

    use Role::*;
    let routes: Vec<(Method, &str, Option<Value>, Role)> = vec![
        (Method::GET, "/v1/pipelines", None, Viewer),
        (Method::GET, "/v1/pipelines/inv", None, Viewer),
        (Method::GET, "/v1/pipelines/inv/health", None, Viewer),
        (Method::GET, "/v1/runs", None, Viewer),
        (Method::GET, "/v1/connectors/status", None, Viewer),
        (
            Method::GET,
            "/v1/finance/cash-flow?from=2024-01-01&to=2024-12-31",
            None,
            Analyst,
        ),
        (Method::GET, "/v1/runs/nope", None, Viewer),
        (Method::POST, "/v1/pipelines/inv/sync", None, Operator),
        (Method::GET, "/v1/quarantine", None, Analyst),
        (Method::GET, "/v1/quarantine/stats", None, Analyst),
        (Method::GET, "/v1/quarantine/nope", None, Analyst),
        (
            Method::PATCH,
            "/v1/quarantine/nope",
            Some(json!({ "raw": {} })),
            Admin,
        ),
        (Method::POST, "/v1/quarantine/nope/retry", None, Admin),
        (
            Method::POST,
            "/v1/quarantine/nope/ignore",
            Some(json!({ "reason": "x" })),
            Admin,
        ),
        (
            Method::POST,
            "/v1/quarantine/retry",
            Some(json!({ "pipeline": "inv" })),
            Admin,
        ),
        (Method::GET, "/v1/dead-letters", None, Operator),
        (Method::GET, "/v1/dead-letters/nope", None, Operator),
        (
            Method::POST,
            "/v1/pipelines",
            Some(pipeline("other", "x.csv")),
            Admin,
        ),
        (
            Method::PUT,
            "/v1/pipelines/inv",
            Some(pipeline("inv", &example_csv())),
            Admin,
        ),
        (Method::POST, "/v1/dead-letters/nope/replay", None, Admin),
        (Method::GET, "/v1/keys", None, Admin),
        (Method::GET, "/v1/audit", None, Admin),
        (Method::DELETE, "/v1/pipelines/nope", None, Admin),
        (Method::GET, "/v1/webhooks", None, Operator),
        (Method::GET, "/v1/webhooks/nope", None, Operator),
        (Method::GET, "/v1/webhooks/nope/deliveries", None, Operator),
        (
            Method::POST,
            "/v1/webhooks",
            Some(json!({ "url": "http://169.254.169.254/" })),
            Admin,
        ),
        (Method::DELETE, "/v1/webhooks/nope", None, Admin),
        (Method::POST, "/v1/webhooks/nope/rotate-secret", None, Admin),
        (Method::POST, "/v1/webhooks/nope/test", None, Admin),
        (Method::GET, "/v1/webhook-deliveries/nope", None, Operator),
        (
            Method::POST,
            "/v1/webhook-deliveries/nope/replay",
            None,
            Admin,
        ),
    ];
    for role in [Viewer, Analyst, Operator, Admin] {
        let key = api.key(Some("acme"), role).await;
        for (method, path, body, needs) in &routes {
            let a = api
                .call(method.clone(), path, Some(&key), body.clone())
                .await;
            if role >= *needs {
                assert!(
                    a.status != StatusCode::FORBIDDEN && a.status != StatusCode::UNAUTHORIZED,
                    "{role:?} {method} {path}: {} {}",
                    a.status,
                    a.body
                );
            } else {
                assert_problem(&a, StatusCode::FORBIDDEN);
            }
            if *method == Method::POST
                && *path == "/v1/pipelines"
                && a.status == StatusCode::CREATED
            {
                // Let the next role create it again.
                api.call(Method::DELETE, "/v1/pipelines/other", Some(&admin), None)
                    .await;
            }
        }
    }
    // A platform key reaches no tenant's data.
    let platform = api.key(None, Platform).await;
    for (method, path, body, _) in &routes {
        if *path == "/v1/keys" {
            continue;
        }
        let a = api
            .call(method.clone(), path, Some(&platform), body.clone())
            .await;
        assert_problem(&a, StatusCode::FORBIDDEN);
    }
    // No key, a malformed key, a revoked key: 401.
    assert_problem(
        &api.call(Method::GET, "/v1/pipelines", None, None).await,
        StatusCode::UNAUTHORIZED,
    );
    assert_problem(
        &api.call(Method::GET, "/v1/pipelines", Some("slk_nope"), None)
            .await,
        StatusCode::UNAUTHORIZED,
    );
    let keys = api.call(Method::GET, "/v1/keys", Some(&admin), None).await;
    let viewer = keys.body["items"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["role"] == "viewer")
        .expect("a viewer key")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let revoked = api
        .call(
            Method::DELETE,
            &format!("/v1/keys/{viewer}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    assert!(
        keys.body.to_string().find("\"hash\"").is_none(),
        "hashes never leave"
    );
}

#[tokio::test]
async fn another_tenants_resources_are_404_never_data() {
    let api = Api::new().await;
    let a = api.key(Some("acme"), Role::Admin).await;
    let b = api.key(Some("globex"), Role::Admin).await;
    let created = api
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&b),
            Some(pipeline("ledger", &example_csv())),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let run = api
        .call(Method::POST, "/v1/pipelines/ledger/sync", Some(&b), None)
        .await;
    assert_eq!(run.status, StatusCode::ACCEPTED);
    let run_id = run.body["run_id"].as_str().expect("run").to_string();
    for (method, path) in [
        (Method::GET, "/v1/pipelines/ledger".to_string()),
        (Method::GET, "/v1/pipelines/ledger/health".to_string()),
        (Method::POST, "/v1/pipelines/ledger/sync".to_string()),
        (Method::DELETE, "/v1/pipelines/ledger".to_string()),
        (Method::GET, format!("/v1/runs/{run_id}")),
    ] {
        let ans = api.call(method.clone(), &path, Some(&a), None).await;
        assert_problem(&ans, StatusCode::NOT_FOUND);
        assert!(
            !ans.body.to_string().contains("globex"),
            "{path}: {}",
            ans.body
        );
    }
    let listed = api.call(Method::GET, "/v1/pipelines", Some(&a), None).await;
    assert_eq!(listed.body["items"], json!([]));
    // A tenant admin cannot make a key for another tenant.
    let key = api
        .call(
            Method::POST,
            "/v1/keys",
            Some(&a),
            Some(json!({ "role": "viewer", "tenant": "globex" })),
        )
        .await;
    assert_problem(&key, StatusCode::NOT_FOUND);
    // Nor name another tenant in a pipeline.
    let mut body = pipeline("x", "x.csv");
    body["tenant"] = json!("globex");
    let p = api
        .call(Method::POST, "/v1/pipelines", Some(&a), Some(body))
        .await;
    assert_problem(&p, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn errors_are_problem_documents_with_the_request_id() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    // The caller's request id is kept and returned.
    let a = api
        .call_with(
            Method::GET,
            "/v1/pipelines/nope",
            Some(&admin),
            None,
            &[("x-request-id", "req-123")],
        )
        .await;
    assert_problem(&a, StatusCode::NOT_FOUND);
    assert_eq!(a.body["correlation_id"], "req-123");
    // Unknown route, wrong method, malformed JSON, unknown field, bad query.
    assert_problem(
        &api.call(Method::GET, "/v1/nothing", Some(&admin), None)
            .await,
        StatusCode::NOT_FOUND,
    );
    assert_problem(
        &api.call(Method::PATCH, "/v1/pipelines", Some(&admin), None)
            .await,
        StatusCode::METHOD_NOT_ALLOWED,
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/pipelines")
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .expect("request");
    let resp = api.app.clone().oneshot(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value =
        serde_json::from_slice(&to_bytes(resp.into_body(), 1 << 20).await.expect("body"))
            .expect("json");
    assert!(body["correlation_id"].is_string(), "{body}");
    let mut unknown = pipeline("p", "x.csv");
    unknown["colour"] = json!("blue");
    let u = api
        .call(Method::POST, "/v1/pipelines", Some(&admin), Some(unknown))
        .await;
    assert_problem(&u, StatusCode::BAD_REQUEST);
    assert!(
        u.body["detail"].as_str().unwrap_or("").contains("colour"),
        "{}",
        u.body
    );
    assert_problem(
        &api.call(Method::GET, "/v1/runs?status=bogus", Some(&admin), None)
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_problem(
        &api.call(Method::GET, "/v1/runs?color=1", Some(&admin), None)
            .await,
        StatusCode::BAD_REQUEST,
    );
    // Successful answers carry a request id too.
    let ok = api.call(Method::GET, "/health", None, None).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.headers.get("x-request-id").is_some());
}

#[tokio::test]
async fn syncs_join_and_honour_idempotency_keys_and_secrets_stay_write_only() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let op = api.key(Some("acme"), Role::Operator).await;
    api.call(
        Method::POST,
        "/v1/pipelines",
        Some(&admin),
        Some(pipeline("inv", &example_csv())),
    )
    .await;
    let first = api
        .call(Method::POST, "/v1/pipelines/inv/sync", Some(&op), None)
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(first.body["outcome"], "enqueued");
    let run = first.body["run_id"].as_str().expect("run").to_string();
    assert_eq!(first.body["url"], format!("/v1/runs/{run}"));
    let second = api
        .call(Method::POST, "/v1/pipelines/inv/sync", Some(&op), None)
        .await;
    assert_eq!(second.body["run_id"], run.as_str());
    assert_eq!(second.body["outcome"], "joined");
    let keyed = api
        .call_with(
            Method::POST,
            "/v1/pipelines/inv/sync",
            Some(&op),
            None,
            &[("idempotency-key", "close-june")],
        )
        .await;
    assert_eq!(keyed.body["run_id"], run.as_str());

    // A database pipeline: its password is stored sealed and never returned.
    let db = json!({ "name": "erp", "entity": "invoices", "source": {
        "kind": "postgres", "url": "postgres://erp:hunter2@db/erp", "password": "s3cret", "table": "invoices" } });
    let made = api
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&admin),
            Some(db.clone()),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    for a in [
        made,
        api.call(Method::GET, "/v1/pipelines/erp", Some(&admin), None)
            .await,
        api.call(Method::GET, "/v1/pipelines", Some(&admin), None)
            .await,
        api.call(Method::GET, "/v1/audit", Some(&admin), None).await,
    ] {
        let text = a.body.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
    }
    let shown = api
        .call(Method::GET, "/v1/pipelines/erp", Some(&admin), None)
        .await;
    assert_eq!(
        shown.body["secrets"],
        json!(["source.password", "source.url"])
    );
    // An update that leaves the secrets out keeps them while the source points at the
    // same host, port, user and database.
    let mut update = db.clone();
    update["source"]["url"] = json!("postgres://erp@db/erp");
    update["source"]["table"] = json!("invoices_2024");
    update["source"]
        .as_object_mut()
        .expect("obj")
        .remove("password");
    let put = api
        .call(
            Method::PUT,
            "/v1/pipelines/erp",
            Some(&admin),
            Some(update.clone()),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    // The URL as GET shows it keeps the stored URL's password too.
    assert_eq!(
        put.body["secrets"],
        json!(["source.password", "source.url"])
    );
    // Pointing it at another host without sending the password again is refused: the
    // stored password must not follow the pipeline to a server of the caller's choosing.
    for (field, other) in [
        ("url", "postgres://erp@evil.example/erp"),
        ("url", "postgres://erp@db:6543/erp"),
        ("url", "postgres://root@db/erp"),
        ("url", "postgres://erp@db/other"),
        ("url", "postgres://erp@db/erp?host=evil.example"),
    ] {
        let mut swap = update.clone();
        swap["source"][field] = json!(other);
        let refused = api
            .call(Method::PUT, "/v1/pipelines/erp", Some(&admin), Some(swap))
            .await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{other}: {}",
            refused.body
        );
        assert!(
            refused.body["detail"]
                .as_str()
                .unwrap_or("")
                .contains("send `password` again"),
            "{}",
            refused.body
        );
    }
    let mut moved = update.clone();
    moved["source"]["url"] = json!("postgres://erp@db2/erp");
    moved["source"]["password"] = json!("n3w");
    let put = api
        .call(
            Method::PUT,
            "/v1/pipelines/erp",
            Some(&admin),
            Some(moved.clone()),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    assert_eq!(
        put.body["pipeline"]["source"]["url"],
        "postgres://erp@db2/erp"
    );
    // `null` removes a secret.
    moved["source"]["password"] = Value::Null;
    let put = api
        .call(Method::PUT, "/v1/pipelines/erp", Some(&admin), Some(moved))
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    assert_eq!(put.body["secrets"], json!([]));

    // Every change is in the audit log, newest first, with the key that made it.
    let audit = api.call(Method::GET, "/v1/audit", Some(&admin), None).await;
    let actions: Vec<&str> = audit.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        actions,
        [
            "pipeline.update",
            "pipeline.update",
            "pipeline.update",
            "pipeline.create",
            "pipeline.sync",
            "pipeline.create"
        ]
    );
    // One entry per change, by the key that made it.
    assert!(
        audit.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|e| e["actor"] != "cli"),
        "{}",
        audit.body
    );
    assert!(audit.body["items"][0]["detail"]["before"].is_object());
}

#[tokio::test]
async fn keys_are_shown_once_and_a_platform_key_provisions_tenant_keys() {
    let api = Api::new().await;
    let platform = api.key(None, Role::Platform).await;
    let made = api
        .call(
            Method::POST,
            "/v1/keys",
            Some(&platform),
            Some(json!({ "role": "admin", "tenant": "initech" })),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let key = made.body["key"].as_str().expect("key").to_string();
    // The new key works for its tenant...
    let listed = api.call(Method::GET, "/v1/keys", Some(&key), None).await;
    assert_eq!(listed.status, StatusCode::OK);
    let items = listed.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert!(
        items[0].get("key").is_none(),
        "the key is never shown again"
    );
    // ... and is revoked for good.
    let id = made.body["id"].as_str().expect("id");
    let r = api
        .call(Method::DELETE, &format!("/v1/keys/{id}"), Some(&key), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_problem(
        &api.call(Method::GET, "/v1/keys", Some(&key), None).await,
        StatusCode::UNAUTHORIZED,
    );
    // A tenant key cannot make a platform key.
    let admin = api.key(Some("acme"), Role::Admin).await;
    let p = api
        .call(
            Method::POST,
            "/v1/keys",
            Some(&admin),
            Some(json!({ "role": "platform" })),
        )
        .await;
    assert_problem(&p, StatusCode::FORBIDDEN);
}

/// Polls a run until it has ended.
#[tokio::test]
async fn a_quarantined_row_is_fixed_retried_loaded_and_a_batch_retry_accounts_for_every_row() {
    let api = Api::new().await;
    // A worker in this process runs the syncs and replays the API queues.
    let worker = api.start_worker().await;

    let admin = api.key(Some("acme"), Role::Admin).await;
    let analyst = api.key(Some("acme"), Role::Analyst).await;
    let viewer = api.key(Some("acme"), Role::Viewer).await;
    // Batches (and so replay pages) of two rows: a replay of seven reads four pages.
    let mut inv = example_pipeline("inv");
    inv["batch_rows"] = json!(2);
    let made = api
        .call(Method::POST, "/v1/pipelines", Some(&admin), Some(inv))
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let sync = api
        .call(Method::POST, "/v1/pipelines/inv/sync", Some(&admin), None)
        .await;
    let run = finished_run(&api, &admin, sync.body["run_id"].as_str().expect("run")).await;
    assert_eq!(run["quarantined"], 8, "{run}");
    assert_eq!(run["quarantined_by_rule"]["currency_code"], 1, "{run}");

    // Paging covers every row once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/quarantine?limit=3&cursor={c}"),
            None => "/v1/quarantine?limit=3".to_string(),
        };
        let page = api.call(Method::GET, &path, Some(&analyst), None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        for r in page.body["items"].as_array().expect("items") {
            seen.push(r["id"].as_str().expect("id").to_string());
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (8, 8));
    assert_problem(
        &api.call(Method::GET, "/v1/quarantine", Some(&viewer), None)
            .await,
        StatusCode::FORBIDDEN,
    );

    // Fix the bad currency, retry the row: it loads and is marked replayed.
    let bad = api
        .call(
            Method::GET,
            "/v1/quarantine?rule=currency_code&field=currency",
            Some(&analyst),
            None,
        )
        .await;
    let row = &bad.body["items"][0];
    let id = row["id"].as_str().expect("id").to_string();
    assert_eq!(row["errors"][0]["field"], "currency");
    assert_eq!(row["raw"]["Currency"], "USX", "{row}");
    let denied = api
        .call(
            Method::PATCH,
            &format!("/v1/quarantine/{id}"),
            Some(&analyst),
            Some(json!({ "raw": { "Currency": "USD" } })),
        )
        .await;
    assert_problem(&denied, StatusCode::FORBIDDEN);
    let fixed = api
        .call(
            Method::PATCH,
            &format!("/v1/quarantine/{id}"),
            Some(&admin),
            Some(json!({ "raw": { "Currency": "USD" } })),
        )
        .await;
    assert_eq!(fixed.status, StatusCode::OK, "{}", fixed.body);
    assert_eq!(fixed.body["status"], "fixed");
    assert_eq!(fixed.body["raw"]["Currency"], "USD");
    assert_eq!(
        fixed.body["raw"]["InvoiceId"], row["raw"]["InvoiceId"],
        "other columns stay"
    );
    let retried = api
        .call(
            Method::POST,
            &format!("/v1/quarantine/{id}/retry"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(retried.status, StatusCode::ACCEPTED);
    let replay = finished_run(&api, &admin, retried.body["run_id"].as_str().expect("run")).await;
    assert_eq!(replay["trigger"], "replay");
    assert_eq!(
        (replay["rows_read"].clone(), replay["inserted"].clone()),
        (json!(1), json!(1))
    );
    let shown = api
        .call(
            Method::GET,
            &format!("/v1/quarantine/{id}"),
            Some(&analyst),
            None,
        )
        .await;
    assert_eq!(shown.body["status"], "replayed");

    // A batch retry by filter: the other seven fail again, stay pending, counted once each
    // (paged two at a time: none read twice, none missed).
    let batch = api
        .call(
            Method::POST,
            "/v1/quarantine/retry",
            Some(&admin),
            Some(json!({ "pipeline": "inv" })),
        )
        .await;
    assert_eq!(batch.status, StatusCode::ACCEPTED, "{}", batch.body);
    let replay = finished_run(&api, &admin, batch.body["run_id"].as_str().expect("run")).await;
    assert_eq!(replay["rows_read"], 7);
    assert_eq!(replay["quarantined"], 7);
    assert_eq!(replay["loaded"], 0);

    // Three runs now (the sync and two replays): newest first, paged, filtered.
    let page = api
        .call(Method::GET, "/v1/runs?limit=2", Some(&viewer), None)
        .await;
    assert_eq!(page.body["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(page.body["items"][0]["trigger"], "replay");
    let cursor = page.body["next_cursor"]
        .as_str()
        .expect("cursor")
        .to_string();
    let rest = api
        .call(
            Method::GET,
            &format!("/v1/runs?limit=2&cursor={cursor}"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(rest.body["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(rest.body["items"][0]["trigger"], "api");
    assert!(rest.body["next_cursor"].is_null());
    let failed = api
        .call(Method::GET, "/v1/runs?status=failed", Some(&viewer), None)
        .await;
    assert_eq!(failed.body["items"], json!([]));

    // Ignore one with a reason; an ignored row can no longer be fixed.
    let other = &seen
        .iter()
        .find(|s| **s != id)
        .expect("another row")
        .clone();
    let ignored = api
        .call(
            Method::POST,
            &format!("/v1/quarantine/{other}/ignore"),
            Some(&admin),
            Some(json!({ "reason": "test data" })),
        )
        .await;
    assert_eq!(ignored.body["status"], "ignored", "{}", ignored.body);
    let late = api
        .call(
            Method::PATCH,
            &format!("/v1/quarantine/{other}"),
            Some(&admin),
            Some(json!({ "raw": { "Total": "1" } })),
        )
        .await;
    assert_problem(&late, StatusCode::CONFLICT);
    let stats = api
        .call(Method::GET, "/v1/quarantine/stats", Some(&analyst), None)
        .await;
    assert_eq!(
        stats.body["by_status"],
        json!({ "pending": 6, "ignored": 1, "replayed": 1 })
    );
    assert_eq!(stats.body["by_rule"]["currency_code"], 1);
    // The currency row was replayed: it no longer counts as open under its rule, while the
    // six pending rows do (a row that broke two rules counts under each).
    let open_by_rule = stats.body["open_by_rule"]
        .as_object()
        .expect("open_by_rule");
    assert!(
        open_by_rule.get("currency_code").is_none(),
        "{}",
        stats.body
    );
    let open: u64 = open_by_rule.values().filter_map(Value::as_u64).sum();
    assert!(open >= 6, "{}", stats.body);

    // Fix and ignore are in the audit log with before and after.
    let audit = api.call(Method::GET, "/v1/audit", Some(&admin), None).await;
    let fix = audit.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|e| e["action"] == "quarantine.fix")
        .expect("fix audited");
    assert_eq!(fix["detail"]["before"]["Currency"], "USX");
    assert_eq!(fix["detail"]["after"]["Currency"], "USD");
    worker.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_the_router_serves() {
    let api = Api::new().await;
    let doc = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert_eq!(doc.body["openapi"], "3.1.0");
    let paths = doc.body["paths"].as_object().expect("paths");
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |o| o.len()))
        .sum();
    assert_eq!(documented, sluice_api::OPERATIONS);
    let admin = api.key(Some("acme"), Role::Admin).await;
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("ops") {
            assert!(
                op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                "{method} {path}"
            );
            // The router serves it: an unknown route is 404 "Not Found" with no route
            // matched, an unknown method 405. Ids in the path make a real route answer 404
            // with its own detail.
            let concrete = path.replace("{name}", "p").replace("{id}", "x");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let body = matches!(m, Method::POST | Method::PUT | Method::PATCH).then(|| json!({}));
            let a = api.call(m, &concrete, Some(&admin), body).await;
            assert_ne!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                a.status != StatusCode::NOT_FOUND || a.body["detail"] != "Not Found",
                "{method} {path} is documented but not served"
            );
        }
    }
}

#[tokio::test]
async fn a_platform_key_provisions_a_tenant_and_connector_status_reports_every_pipeline() {
    let api = Api::new().await;
    let platform = api.key(None, Role::Platform).await;
    let t = api
        .call(
            Method::POST,
            "/v1/tenants",
            Some(&platform),
            Some(json!({ "slug": "initech", "name": "Initech" })),
        )
        .await;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.body);
    assert_problem(
        &api.call(
            Method::POST,
            "/v1/tenants",
            Some(&platform),
            Some(json!({ "slug": "initech" })),
        )
        .await,
        StatusCode::CONFLICT,
    );
    let admin = api.key(Some("initech"), Role::Admin).await;
    assert_problem(
        &api.call(
            Method::POST,
            "/v1/tenants",
            Some(&admin),
            Some(json!({ "slug": "other" })),
        )
        .await,
        StatusCode::FORBIDDEN,
    );
    let mut scheduled = example_pipeline("inv");
    scheduled["schedule"] = json!({ "cron": "0 0 * * * *" });
    api.call(Method::POST, "/v1/pipelines", Some(&admin), Some(scheduled))
        .await;
    api.call(
        Method::POST,
        "/v1/pipelines",
        Some(&admin),
        Some(pipeline("missing", "nonexistent/file.csv")),
    )
    .await;
    let status = api
        .call(Method::GET, "/v1/connectors/status", Some(&admin), None)
        .await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.body);
    let items = status.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    let inv = items.iter().find(|i| i["pipeline"] == "inv").expect("inv");
    assert_eq!(inv["health"]["ok"], true, "{inv}");
    assert!(
        inv["next_run"]
            .as_str()
            .is_some_and(|n| n.contains(":00:00")),
        "{inv}"
    );
    assert!(inv["last_run"].is_null());
    let missing = items
        .iter()
        .find(|i| i["pipeline"] == "missing")
        .expect("missing");
    assert_eq!(missing["health"]["ok"], false);
    assert!(missing["next_run"].is_null());
}

#[tokio::test]
async fn uploads_are_checked_by_content_loaded_once_and_limited_in_size() {
    let api = Api::new().await;
    let worker = api.start_worker().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let op = api.key(Some("acme"), Role::Operator).await;
    let viewer = api.key(Some("acme"), Role::Viewer).await;
    // A pipeline made for uploads has no path.
    let mut p = example_pipeline("drop");
    p["source"].as_object_mut().expect("source").remove("path");
    let made = api
        .call(Method::POST, "/v1/pipelines", Some(&admin), Some(p))
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let csv = std::fs::read(example_csv()).expect("csv");

    assert_problem(
        &upload(&api, &viewer, "drop", "invoices.csv", &csv).await,
        StatusCode::FORBIDDEN,
    );
    let first = upload(&api, &op, "drop", "invoices.csv", &csv).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    assert_eq!(first.body["duplicate"], false);
    let run = first.body["run_id"].as_str().expect("run").to_string();
    let done = finished_run(&api, &op, &run).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        (done["inserted"].clone(), done["quarantined"].clone()),
        (json!(16), json!(8))
    );
    // The same content under another name: not loaded again.
    let again = upload(&api, &op, "drop", "copy.csv", &csv).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["run_id"], run.as_str());
    let runs = api
        .call(Method::GET, "/v1/runs?pipeline=drop", Some(&op), None)
        .await;
    assert_eq!(runs.body["items"].as_array().map(Vec::len), Some(1));
    // A binary renamed .csv, and a workbook sent to a CSV pipeline: 415.
    assert_problem(
        &upload(
            &api,
            &op,
            "drop",
            "invoices.csv",
            b"\x7fELF\x02\x01\x01\0\0\0\0",
        )
        .await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    );
    assert_problem(
        &upload(&api, &op, "drop", "book.csv", b"PK\x03\x04\x14\0\0\0").await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    );
    assert_problem(
        &upload(&api, &op, "drop", "empty.csv", b"").await,
        StatusCode::BAD_REQUEST,
    );
    // Another tenant's pipeline: 404.
    let other = api.key(Some("globex"), Role::Operator).await;
    assert_problem(
        &upload(&api, &other, "drop", "invoices.csv", &csv).await,
        StatusCode::NOT_FOUND,
    );
    worker.stop().await;

    // Over the size limit: 413, and nothing is kept.
    let small = Api::with_upload_limit(1000).await;
    let admin = small.key(Some("acme"), Role::Admin).await;
    let mut p = example_pipeline("drop");
    p["source"].as_object_mut().expect("source").remove("path");
    small
        .call(Method::POST, "/v1/pipelines", Some(&admin), Some(p))
        .await;
    assert!(csv.len() > 1000);
    assert_problem(
        &upload(&small, &admin, "drop", "invoices.csv", &csv).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    let kept: Vec<_> = std::fs::read_dir(small._dir.path().join("uploads/acme/drop"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "{kept:?}");
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not() {
    let api = Api::build(|s| {
        s.rate = sluice_api::rate_limit::RateLimit {
            burst: 3.0,
            per_second: 0.5,
        }
    })
    .await;
    let busy = api.key(Some("acme"), Role::Viewer).await;
    let calm = api.key(Some("acme"), Role::Viewer).await;
    for _ in 0..3 {
        let a = api
            .call(Method::GET, "/v1/pipelines", Some(&busy), None)
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let limited = api
        .call(Method::GET, "/v1/pipelines", Some(&busy), None)
        .await;
    assert_problem(&limited, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = limited
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=2).contains(&wait), "{wait}");
    let other = api
        .call(Method::GET, "/v1/pipelines", Some(&calm), None)
        .await;
    assert_eq!(other.status, StatusCode::OK, "the limit is per key");
}

#[tokio::test]
async fn lists_page_by_cursor() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    for i in 0..5 {
        let a = api
            .call(
                Method::POST,
                "/v1/pipelines",
                Some(&admin),
                Some(pipeline(&format!("p{i}"), "x.csv")),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED);
    }
    let first = api
        .call(Method::GET, "/v1/pipelines?limit=2", Some(&admin), None)
        .await;
    let names = |a: &Answer| -> Vec<String> {
        a.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|p| p["name"].as_str().expect("name").to_string())
            .collect()
    };
    assert_eq!(names(&first), ["p0", "p1"]);
    assert_eq!(first.body["next_cursor"], "p1");
    let second = api
        .call(
            Method::GET,
            "/v1/pipelines?limit=2&cursor=p1",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(names(&second), ["p2", "p3"]);
    let last = api
        .call(
            Method::GET,
            "/v1/pipelines?limit=2&cursor=p3",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(names(&last), ["p4"]);
    assert!(last.body["next_cursor"].is_null());
}

#[tokio::test]
async fn a_queued_run_answers_queued_until_a_worker_starts_it() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let other = api.key(Some("globex"), Role::Admin).await;
    let created = api
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&admin),
            Some(example_pipeline("inv")),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    // No worker yet: the run waits in the queue, and the tenant has no warehouse yet.
    let sync = api
        .call(Method::POST, "/v1/pipelines/inv/sync", Some(&admin), None)
        .await;
    assert_eq!(sync.status, StatusCode::ACCEPTED, "{}", sync.body);
    let url = sync.body["url"].as_str().expect("url").to_string();
    let queued = api.call(Method::GET, &url, Some(&admin), None).await;
    assert_eq!(queued.status, StatusCode::OK, "{}", queued.body);
    assert_eq!(queued.body["status"], "queued");
    assert_eq!(queued.body["pipeline"], "inv");
    assert_eq!(queued.body["entity"], "invoices");
    assert_eq!(queued.body["rows_read"], 0);
    assert_problem(
        &api.call(Method::GET, &url, Some(&other), None).await,
        StatusCode::NOT_FOUND,
    );
    assert_problem(
        &api.call(Method::GET, "/v1/runs/never-queued", Some(&admin), None)
            .await,
        StatusCode::NOT_FOUND,
    );
    let worker = api.start_worker().await;
    let run = finished_run(&api, &admin, sync.body["run_id"].as_str().expect("run")).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    worker.stop().await;
}
