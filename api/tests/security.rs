//! What a tenant's admin must not reach through the API (SECURITY.md): the server's files,
//! its network, another pipeline's idempotency keys; secrets that must never come back;
//! key guessing that must cost the guesser.

use std::time::Duration;

use futures_util::StreamExt;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_engine::TenantSlug;
use sluice_engine::control::{PipelineChange, PipelineOrigin, PipelineStore, Role};

mod harness;
use harness::*;

fn detail(a: &Answer) -> String {
    a.body["detail"].as_str().unwrap_or_default().to_string()
}

/// Stores a pipeline as an admin's API call would have before confinement existed, to
/// prove the run-time check.
async fn stored_by_api(api: &Api, spec: Value) {
    let name = spec["name"].as_str().expect("name").to_string();
    let mut spec = spec;
    spec["tenant"] = json!("acme");
    api.warehouse
        .save_pipeline(
            &TenantSlug::parse("acme").expect("slug"),
            &name,
            &spec,
            &serde_json::Map::new(),
            &PipelineChange {
                actor: "key_old".into(),
                action: "pipeline.create",
                origin: PipelineOrigin::Api,
                detail: json!({}),
            },
        )
        .await
        .expect("store");
}

/// The dead letter of `pipeline`'s sync, once the worker gave up on it.
async fn dead_letter_of(api: &Api, key: &str, pipeline: &str) -> Value {
    for _ in 0..200 {
        let list = api
            .call(Method::GET, "/v1/dead-letters", Some(key), None)
            .await;
        if let Some(letter) = list.body["items"]
            .as_array()
            .and_then(|items| items.iter().find(|l| l["pipeline"] == pipeline))
        {
            return letter.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no dead letter for {pipeline}");
}

#[tokio::test]
async fn an_admin_cannot_read_server_files_through_a_pipeline() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    for path in [
        "/etc/hostname",
        "../../../../../../etc/hostname",
        "/proc/self/environ",
    ] {
        let made = api
            .call(
                Method::POST,
                "/v1/pipelines",
                Some(&admin),
                Some(pipeline("leak", path)),
            )
            .await;
        assert_eq!(
            made.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            made.body
        );
        assert!(
            detail(&made).contains("outside the directories"),
            "{}",
            made.body
        );
    }
    // A pipeline stored before the check existed is refused again when it runs, and
    // nothing of the file reaches an error, a run or the quarantine.
    stored_by_api(
        &api,
        json!({ "name": "old", "entity": "invoices",
                "source": { "kind": "csv", "path": "/etc/hostname" } }),
    )
    .await;
    let worker = api.start_worker().await;
    let sync = api
        .call(Method::POST, "/v1/pipelines/old/sync", Some(&admin), None)
        .await;
    assert_eq!(sync.status, StatusCode::ACCEPTED, "{}", sync.body);
    let letter = dead_letter_of(&api, &admin, "old").await;
    worker.stop().await;
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or("")
            .contains("outside the directories"),
        "{letter}"
    );
    let secret = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let secret = secret.trim();
    let quarantine = api
        .call(Method::GET, "/v1/quarantine", Some(&admin), None)
        .await;
    assert_eq!(quarantine.body["items"], json!([]), "{}", quarantine.body);
    if !secret.is_empty() {
        assert!(!letter.to_string().contains(secret), "{letter}");
    }
}

#[tokio::test]
async fn sources_may_not_reach_the_servers_network_without_an_allow_list() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let sql = |url: &str| {
        json!({ "name": "db", "entity": "invoices",
                "source": { "kind": "postgres", "url": url, "table": "invoices" } })
    };
    let refused = [
        json!({ "name": "o", "entity": "invoices", "source": { "kind": "odoo",
            "url": "http://169.254.169.254/latest/meta-data", "db": "d", "login": "l",
            "api_key": "k", "stream": "invoices" } }),
        json!({ "name": "q", "entity": "invoices", "source": { "kind": "quickbooks",
            "realm_id": "1", "client_id": "c", "client_secret": "s", "refresh_token": "r",
            "stream": "Invoice", "base_url": "http://10.0.0.5" } }),
        json!({ "name": "q", "entity": "invoices", "source": { "kind": "quickbooks",
            "realm_id": "1", "client_id": "c", "client_secret": "s", "refresh_token": "r",
            "stream": "Invoice", "token_url": "http://[::1]:8080/token" } }),
        sql("postgres://erp@127.0.0.1:5432/erp"),
        sql("postgres://erp@localhost/erp"),
        sql("postgres://erp@192.168.1.10/erp"),
        sql("postgres://erp@db.example/erp?host=/var/run/postgresql"),
        sql("postgres:///erp"),
        json!({ "name": "m", "entity": "invoices", "source": { "kind": "mysql",
            "url": "mysql://root@db.example/erp?socket=/run/mysqld/mysqld.sock",
            "table": "invoices" } }),
    ];
    for body in refused {
        let made = api
            .call(
                Method::POST,
                "/v1/pipelines",
                Some(&admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            made.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            made.body
        );
        assert!(
            detail(&made).contains("--allow-source-hosts"),
            "{body}: {}",
            made.body
        );
    }

    // A pipeline stored before the policy existed is refused when the worker connects
    // (where every resolved address is checked too).
    stored_by_api(&api, sql("postgres://erp@127.0.0.1:5432/erp")).await;
    let worker = api.start_worker().await;
    api.call(Method::POST, "/v1/pipelines/db/sync", Some(&admin), None)
        .await;
    let letter = dead_letter_of(&api, &admin, "db").await;
    worker.stop().await;
    assert!(
        letter["reason"].as_str().unwrap_or("").contains("loopback"),
        "{letter}"
    );

    // The operator opens what they choose.
    let open = Api::build(|s| {
        let egress = sluice_connectors::egress::EgressPolicy::allowing("127.0.0.0/8,10.0.0.0/8")
            .expect("allow");
        s.confinement =
            sluice_pipelines::Confinement::new(None, &std::env::temp_dir().join("u"), egress)
                .expect("confinement");
    })
    .await;
    let admin = open.key(Some("acme"), Role::Admin).await;
    let made = open
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&admin),
            Some(sql("postgres://erp@127.0.0.1:5432/erp")),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let still = open
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&admin),
            Some(
                json!({ "name": "o", "entity": "invoices", "source": { "kind": "odoo",
                "url": "http://169.254.169.254/", "db": "d", "login": "l", "api_key": "k",
                "stream": "invoices" } }),
            ),
        )
        .await;
    assert_eq!(still.status, StatusCode::BAD_REQUEST, "{}", still.body);
}

#[tokio::test]
async fn a_password_in_a_url_query_is_a_secret_and_never_comes_back() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let url = "postgres://erp@db.example/erp?sslmode=require&password=hunter2&sslpassword=k3y";
    let made = api
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&admin),
            Some(json!({ "name": "erp", "entity": "invoices",
                "source": { "kind": "postgres", "url": url, "table": "invoices" } })),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    assert_eq!(made.body["secrets"], json!(["source.url"]));
    assert_eq!(
        made.body["pipeline"]["source"]["url"],
        "postgres://erp@db.example/erp?sslmode=require"
    );
    for a in [
        made,
        api.call(Method::GET, "/v1/pipelines/erp", Some(&admin), None)
            .await,
        api.call(Method::GET, "/v1/pipelines", Some(&admin), None)
            .await,
        api.call(Method::GET, "/v1/audit", Some(&admin), None).await,
        api.call(Method::GET, "/v1/pipelines/erp/health", Some(&admin), None)
            .await,
    ] {
        let text = a.body.to_string();
        assert!(!text.contains("hunter2") && !text.contains("k3y"), "{text}");
    }
}

#[tokio::test]
async fn batch_rows_has_an_upper_bound() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let mut body = pipeline("big", "x.csv");
    body["batch_rows"] = json!(1_000_000_000u64);
    let made = api
        .call(Method::POST, "/v1/pipelines", Some(&admin), Some(body))
        .await;
    assert_eq!(made.status, StatusCode::BAD_REQUEST, "{}", made.body);
    assert!(detail(&made).contains("batch_rows"), "{}", made.body);
}

#[tokio::test]
async fn guessing_keys_is_rate_limited_per_address_and_valid_keys_still_pass() {
    let api = Api::new().await;
    let viewer = api.key(Some("acme"), Role::Viewer).await;
    let mut limited = None;
    for i in 0..40 {
        let a = api
            .call(
                Method::GET,
                "/v1/pipelines",
                Some(&format!("slk_guess{i:04}_xxxxxxxxxxxxxxxxxxxxxxxx")),
                None,
            )
            .await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((i, a));
            break;
        }
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    }
    let (i, a) = limited.expect("never limited");
    assert!(i >= 20, "limited after {i} failures");
    assert!(a.headers.get("retry-after").is_some());
    // Requests without any key count too; a valid key from the same address passes.
    let none = api.call(Method::GET, "/v1/pipelines", None, None).await;
    assert_eq!(none.status, StatusCode::TOO_MANY_REQUESTS);
    let ok = api
        .call(Method::GET, "/v1/pipelines", Some(&viewer), None)
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
}

#[tokio::test]
async fn uploads_count_against_a_tenant_quota_and_an_abandoned_upload_leaves_nothing() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let api = Api::build(|s| s.upload_quota = 80).await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let mut body = pipeline("up", "x.csv");
    body["source"]
        .as_object_mut()
        .expect("source")
        .remove("path");
    let made = api
        .call(Method::POST, "/v1/pipelines", Some(&admin), Some(body))
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let first = upload(
        &api,
        &admin,
        "up",
        "a.csv",
        b"invoice_number,total\nA-1,10.00\nA-2,12.50\nA-3,1.00\n",
    )
    .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let second = upload(
        &api,
        &admin,
        "up",
        "b.csv",
        b"invoice_number,total\nB-1,10.00\nB-2,12.50\nB-3,1.00\n",
    )
    .await;
    assert_eq!(
        second.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        second.body
    );
    assert!(detail(&second).contains("quota"), "{}", second.body);

    // A client that stops sending mid-file: the request is dropped and so is its file.
    let boundary = "b";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.csv\"\r\nContent-Type: text/csv\r\n\r\nid\n1\n"
    );
    let stalled =
        futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from(head))])
            .chain(futures_util::stream::pending());
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/pipelines/up/files")
        .header("authorization", format!("Bearer {admin}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from_stream(stalled))
        .expect("request");
    let abandoned =
        tokio::time::timeout(Duration::from_millis(500), api.app.clone().oneshot(req)).await;
    assert!(abandoned.is_err(), "the stalled upload finished");
    let dir = api._dir.path().join("uploads/acme/up");
    let temps: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
        .collect();
    assert!(temps.is_empty(), "left behind: {temps:?}");
}

/// A one-part workbook whose sheet inflates to just over 1 GiB of XML while the file is
/// a few megabytes: a deflate stream of spaces made of one flushed block repeated (each
/// repetition decodes to 1 MiB against a window of spaces), in a ZIP written by hand. Its
/// CRC is not computed: nothing that reads it may get that far.
fn gigabyte_bomb() -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut deflate = Compress::new(Compression::best(), false);
    let mut stream = Vec::new();
    let mut step = |input: &[u8], flush: FlushCompress| {
        let mut out = Vec::with_capacity(input.len() + 1024);
        deflate
            .compress_vec(input, &mut out, flush)
            .expect("deflate");
        out
    };
    let head = br#"<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData><row r="1"><c r="A1"><v>1</v></c></row>"#;
    let spaces = vec![b' '; 1 << 20];
    stream.extend(step(head, FlushCompress::Sync));
    stream.extend(step(&spaces, FlushCompress::Sync));
    let block = step(&spaces, FlushCompress::Sync);
    for _ in 0..1023 {
        stream.extend_from_slice(&block);
    }
    stream.extend(step(b"</sheetData></worksheet>", FlushCompress::Finish));
    let inflated = (head.len() + (1024 << 20) + 24) as u32;
    let name = b"xl/worksheets/sheet1.xml";
    let mut zip = Vec::new();
    let le16 = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    le32(&mut zip, 0x0403_4b50);
    for x in [20u16, 0, 8, 0, 0] {
        le16(&mut zip, x);
    }
    le32(&mut zip, 0);
    le32(&mut zip, stream.len() as u32);
    le32(&mut zip, inflated);
    le16(&mut zip, name.len() as u16);
    le16(&mut zip, 0);
    zip.extend_from_slice(name);
    zip.extend_from_slice(&stream);
    let directory = zip.len() as u32;
    le32(&mut zip, 0x0201_4b50);
    for x in [20u16, 20, 0, 8, 0, 0] {
        le16(&mut zip, x);
    }
    le32(&mut zip, 0);
    le32(&mut zip, stream.len() as u32);
    le32(&mut zip, inflated);
    for x in [name.len() as u16, 0, 0, 0, 0] {
        le16(&mut zip, x);
    }
    le32(&mut zip, 0);
    le32(&mut zip, 0);
    zip.extend_from_slice(name);
    let directory_len = zip.len() as u32 - directory;
    le32(&mut zip, 0x0605_4b50);
    for x in [0u16, 0, 1, 1] {
        le16(&mut zip, x);
    }
    le32(&mut zip, directory_len);
    le32(&mut zip, directory);
    le16(&mut zip, 0);
    zip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_workbook_fails_its_run_while_another_tenant_is_answered() {
    let api = Api::new().await;
    let op = api.key(Some("acme"), Role::Admin).await;
    let other = api.key(Some("globex"), Role::Viewer).await;
    let made = api
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(&op),
            Some(json!({ "name": "bills", "entity": "bills", "source": { "kind": "xlsx" } })),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let bomb = gigabyte_bomb();
    assert!(bomb.len() < 16 << 20, "{} bytes", bomb.len());
    let worker = api.start_worker().await;
    let sent = upload(&api, &op, "bills", "bomb.xlsx", &bomb).await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.body);
    let run = sent.body["run_id"].as_str().expect("run").to_string();

    // Another tenant keeps being answered while the workbook is refused.
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    let ended = loop {
        let asked = std::time::Instant::now();
        let a = api
            .call(Method::GET, "/v1/pipelines", Some(&other), None)
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        slowest = slowest.max(asked.elapsed());
        answered += 1;
        let r = api
            .call(Method::GET, &format!("/v1/runs/{run}"), Some(&op), None)
            .await;
        if r.status == StatusCode::OK
            && r.body["status"] != "running"
            && r.body["status"] != "queued"
        {
            break r.body;
        }
        assert!(answered < 2000, "the run never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    worker.stop().await;
    assert_eq!(ended["status"], "failed", "{ended}");
    let error = ended["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("max_ratio")
            || error.contains("max_inflated_bytes")
            || error.contains("max_cell_bytes"),
        "{ended}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "slowest answer {slowest:?}"
    );
    eprintln!(
        "bomb of {} bytes refused ({error}); {answered} answers to the other tenant, slowest {slowest:?}",
        bomb.len()
    );
}
