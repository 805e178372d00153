//! The API in process (tower `oneshot`) on the embedded warehouse and queue, shared by
//! the API's test files.
#![allow(dead_code)]

use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use sluice_api::{AppState, router};
use sluice_engine::SqliteWarehouse;
use sluice_engine::TenantSlug;
use sluice_engine::control::{AccessStore, NewApiKey, Role};
use sluice_engine::secrets::MasterKey;
use sluice_workers::{QueueSettings, Queues};
use tower::ServiceExt;

pub(crate) const MASTER: &str = "4f6e6520737472696e6720746f2072756c65207468656d20616c6c2c206f6e65";

pub(crate) struct Api {
    pub(crate) app: axum::Router,
    pub(crate) warehouse: Arc<SqliteWarehouse>,
    pub(crate) _dir: tempfile::TempDir,
    /// Hosts the server opens to tenants (`--allow-source-hosts`).
    pub(crate) allow: String,
}

/// Workers running in this process over the API's warehouse and queue.
pub(crate) struct Worker {
    pub(crate) stop: tokio::sync::oneshot::Sender<()>,
    pub(crate) task: tokio::task::JoinHandle<Result<(), sluice_workers::WorkerError>>,
}

impl Worker {
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("join").expect("workers");
    }
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: axum::http::HeaderMap,
    pub(crate) body: Value,
}

impl Api {
    pub(crate) async fn new() -> Self {
        Self::build(|_| {}).await
    }

    pub(crate) async fn with_upload_limit(limit: usize) -> Self {
        Self::build(|s| s.upload_limit = limit).await
    }

    /// An API whose tenants may reach `allow` (e.g. a receiver on this machine).
    pub(crate) async fn allowing(allow: &str) -> Self {
        let mut api = Self::build(|s| {
            s.confinement = confinement_allowing(&s.upload_dir, allow);
        })
        .await;
        api.allow = allow.to_string();
        api
    }

    pub(crate) async fn build(configure: impl FnOnce(&mut AppState<SqliteWarehouse>)) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let warehouse = Arc::new(
            SqliteWarehouse::new(dir.path())
                .with_master_key(MasterKey::from_hex(MASTER).expect("key")),
        );
        let queues = Arc::new(
            Queues::connect(QueueSettings::new(None, dir.path().to_path_buf()))
                .await
                .expect("queue"),
        );
        let mut state = AppState::new(warehouse.clone(), queues, confinement(dir.path()));
        configure(&mut state);
        let state = Arc::new(state);
        Api {
            app: router(state),
            warehouse,
            _dir: dir,
            allow: String::new(),
        }
    }

    pub(crate) async fn start_worker(&self) -> Worker {
        let queues = Arc::new(
            Queues::connect(QueueSettings::new(None, self._dir.path().to_path_buf()))
                .await
                .expect("queue"),
        );
        let env = Arc::new(sluice_workers::worker::WorkerEnv::new(
            self.warehouse.clone(),
            queues,
            sluice_workers::retry::RetryPolicy::with_base(std::time::Duration::from_millis(10)),
            confinement_allowing(&self._dir.path().join("uploads"), &self.allow),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            sluice_workers::worker::run_workers(env, &Default::default(), async move {
                let _ = stopped.await;
            })
            .await
        });
        Worker { stop, task }
    }

    pub(crate) async fn key(&self, tenant: Option<&str>, role: Role) -> String {
        let t = tenant.map(|t| TenantSlug::parse(t).expect("slug"));
        let k = NewApiKey::generate(t.as_ref(), role, None).expect("key");
        self.warehouse.create_key(&k.record).await.expect("store");
        k.secret
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        self.call_with(method, path, key, body, &[]).await
    }

    pub(crate) async fn call_with(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (h, v) in headers {
            req = req.header(*h, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = self.app.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }
}

/// The server's confinement in these tests: files under the repository's `examples/`
/// (the example pipelines' files), uploads under `dir`, public hosts only.
pub(crate) fn confinement(dir: &std::path::Path) -> sluice_pipelines::Confinement {
    confinement_allowing(&dir.join("uploads"), "")
}

/// As [`confinement`] with uploads in `uploads`, tenants also reaching `allow`.
pub(crate) fn confinement_allowing(
    uploads: &std::path::Path,
    allow: &str,
) -> sluice_pipelines::Confinement {
    let examples = format!("{}/../examples", env!("CARGO_MANIFEST_DIR"));
    sluice_pipelines::Confinement::new(
        Some(std::path::Path::new(&examples)),
        uploads,
        sluice_connectors::egress::EgressPolicy::allowing(allow).expect("policy"),
    )
    .expect("confinement")
}

pub(crate) fn pipeline(name: &str, csv: &str) -> Value {
    json!({ "name": name, "entity": "invoices", "source": { "kind": "csv", "path": csv } })
}

/// The example invoices pipeline (its CSV and mapping) under another name, as JSON.
pub(crate) fn example_pipeline(name: &str) -> Value {
    let path = format!("{}/../examples/invoices.toml", env!("CARGO_MANIFEST_DIR"));
    let spec =
        sluice_pipelines::PipelineSpec::from_file(std::path::Path::new(&path)).expect("example");
    let mut v = serde_json::to_value(&spec).expect("json");
    v["name"] = json!(name);
    v.as_object_mut().expect("object").remove("tenant");
    v
}

pub(crate) fn example_csv() -> String {
    format!("{}/../examples/invoices.csv", env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn assert_problem(a: &Answer, status: StatusCode) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(
        a.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    assert_eq!(a.body["status"], status.as_u16());
    let id = a.body["correlation_id"].as_str().expect("correlation id");
    assert_eq!(
        a.headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some(id)
    );
}

pub(crate) async fn finished_run(api: &Api, key: &str, run: &str) -> Value {
    for _ in 0..300 {
        let a = api
            .call(Method::GET, &format!("/v1/runs/{run}"), Some(key), None)
            .await;
        if a.status == StatusCode::OK
            && a.body["status"] != "running"
            && a.body["status"] != "queued"
        {
            return a.body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("run {run} did not end");
}

pub(crate) async fn upload(
    api: &Api,
    key: &str,
    pipeline: &str,
    filename: &str,
    content: &[u8],
) -> Answer {
    let boundary = "sluice-test-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: text/csv\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/v1/pipelines/{pipeline}/files"))
        .header("authorization", format!("Bearer {key}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .expect("request");
    let resp = api.app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}
