//! Traces over OTLP: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, `sluice` sends its request,
//! job, run and batch spans to a collector (here a small OTLP/HTTP receiver that decodes
//! the protobuf the way a collector does), each with the ids that tie it to a tenant, a
//! pipeline, a run and the request that asked for it.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// A span as the receiver saw it: its name, attributes, trace and parent.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    attributes: BTreeMap<String, String>,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    service: String,
}

type Spans = Arc<Mutex<Vec<Seen>>>;

async fn receive(State(spans): State<Spans>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut seen = spans.lock().expect("spans");
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                seen.push(Seen {
                    name: span.name,
                    attributes: span
                        .attributes
                        .into_iter()
                        .map(|kv| {
                            (
                                kv.key,
                                text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                            )
                        })
                        .collect(),
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent: span.parent_span_id,
                    service: service.clone(),
                });
            }
        }
    }
    StatusCode::OK
}

fn text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// A receiver on a free port: `POST /v1/traces` with protobuf bodies.
async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_sends_its_run_and_batch_spans_with_their_ids() {
    let (url, spans) = receiver().await;
    let data = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_REDIS_URL")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &url)
        .env("OTEL_SERVICE_NAME", "sluice-test")
        .args(["sync", &example("invoices.toml"), "--json"])
        .output()
        .expect("sync");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let run_id = report["run_id"].as_str().expect("run id").to_string();

    // The process flushed before it exited: the spans are here already.
    let seen = spans.lock().expect("spans").clone();
    let run = seen
        .iter()
        .find(|s| s.name == "run")
        .unwrap_or_else(|| panic!("no run span: {seen:?}"));
    assert_eq!(run.attributes["tenant"], "acme");
    assert_eq!(run.attributes["pipeline"], "acme-invoices");
    assert_eq!(run.attributes["run_id"], run_id);
    assert_eq!(run.service, "sluice-test");
    let batches: Vec<&Seen> = seen.iter().filter(|s| s.name == "batch").collect();
    assert!(!batches.is_empty(), "{seen:?}");
    let mut read = 0u64;
    for b in &batches {
        assert_eq!(b.attributes["run_id"], run_id);
        assert_eq!(
            b.trace_id, run.trace_id,
            "a batch belongs to its run's trace"
        );
        assert_eq!(b.parent, run.span_id, "a batch is a child of its run");
        read += b.attributes["rows_read"].parse::<u64>().expect("rows_read");
    }
    assert_eq!(read, report["rows_read"].as_u64().expect("rows_read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggered_sync_traces_the_request_and_the_job_with_one_correlation_id() {
    let (url, spans) = receiver().await;
    let data = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let serve = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_REDIS_URL")
        .env("SLUICE_MASTER_KEY", support::pg::MASTER_KEY_HEX)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &url)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut serve = support::jobs::Reaper(vec![serve]);
    // Registered and synced once, so the request below starts a run of its own.
    let key_out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_REDIS_URL")
        .env("SLUICE_MASTER_KEY", support::pg::MASTER_KEY_HEX)
        .args(["trigger", &example("invoices.toml"), "--wait", "--json"])
        .output()
        .expect("register");
    assert!(
        key_out.status.success(),
        "{}",
        String::from_utf8_lossy(&key_out.stderr)
    );
    let key = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("SLUICE_DATABASE_URL")
        .env("SLUICE_MASTER_KEY", support::pg::MASTER_KEY_HEX)
        .args(["key", "create", "--tenant", "acme", "--role", "operator"])
        .output()
        .expect("key");
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
    let key = String::from_utf8_lossy(&key.stdout).trim().to_string();

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let sent = client
            .post(format!(
                "http://127.0.0.1:{port}/v1/pipelines/acme-invoices/sync"
            ))
            .bearer_auth(&key)
            .header("x-request-id", "trace-me-42")
            .send()
            .await;
        match sent {
            Ok(a) => break a,
            Err(e) => assert!(Instant::now() < deadline, "serve did not come up: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answer.status().is_success(),
        "{}",
        answer.text().await.unwrap_or_default()
    );

    // The batch processor sends every few seconds; stop the server to flush the rest.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = spans.lock().expect("spans").iter().any(|s| {
            s.name == "job"
                && s.attributes.get("correlation_id").map(String::as_str) == Some("trace-me-42")
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "no job span for the request");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &serve.0[0].id().to_string()])
        .status();
    let _ = serve.0[0].wait();

    let seen = spans.lock().expect("spans").clone();
    let request = seen
        .iter()
        .find(|s| s.name == "request" && s.attributes["correlation_id"] == "trace-me-42")
        .unwrap_or_else(|| panic!("no request span: {seen:?}"));
    assert_eq!(request.attributes["method"], "POST");
    assert_eq!(request.attributes["status"], "202");
    let job = seen
        .iter()
        .find(|s| {
            s.name == "job"
                && s.attributes.get("correlation_id").map(String::as_str) == Some("trace-me-42")
        })
        .expect("job span");
    assert_eq!(job.attributes["tenant"], "acme");
    assert_eq!(job.attributes["pipeline"], "acme-invoices");
    let run_id = &job.attributes["run_id"];
    let run = seen
        .iter()
        .find(|s| s.name == "run" && s.trace_id == job.trace_id)
        .unwrap_or_else(|| panic!("no run span in the job's trace: {seen:?}"));
    assert!(
        run.attributes["run_id"].starts_with(run_id.as_str()),
        "{run:?} {job:?}"
    );
}
