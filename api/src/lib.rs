//! The HTTP API (axum, JSON, under `/v1`) and the web console (HTML, at `/`, see
//! [`console`]): bearer API keys scoped to a tenant with a role,
//! errors as `application/problem+json` with a correlation id, `X-Request-Id` on every
//! response, per-key rate limits, body limits. Served by `sluice serve` next to the
//! workers and the scheduler.

pub mod auth;
pub mod console;
pub mod error;
pub mod export;
pub mod metrics;
pub mod rate_limit;
pub mod request_id;
pub mod routes;
pub mod state;
pub mod upload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;

use serde_json::json;

use sluice_engine::Store;
pub use state::AppState;

use crate::error::ApiError;
use crate::routes::*;
use crate::upload::upload_file;

/// A route as the OpenAPI document describes it.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    /// `get`, `post`, `put`, `patch` or `delete`.
    pub method: &'static str,
    /// The path pattern, e.g. `/v1/pipelines/{name}`.
    pub path: &'static str,
    /// The least role allowed (`public` for no key).
    pub role: &'static str,
    /// What it does.
    pub summary: &'static str,
}

/// One list of routes builds both the router and [`ROUTES`], so the OpenAPI document can
/// never miss a route.
macro_rules! api_routes {
    ($( $method:ident $path:literal => $handler:ident [$role:literal] $summary:literal; )*
     @apart $( $xmethod:ident $xpath:literal [$xrole:literal] $xsummary:literal; )*) => {
        /// Every route the API serves.
        pub const ROUTES: &[RouteDoc] = &[
            $( RouteDoc { method: stringify!($method), path: $path, role: $role, summary: $summary }, )*
            $( RouteDoc { method: stringify!($xmethod), path: $xpath, role: $xrole, summary: $xsummary }, )*
        ];

        fn add_routes<W: Store>(router: Router<Arc<AppState<W>>>) -> Router<Arc<AppState<W>>> {
            router $( .route($path, axum::routing::$method($handler::<W>)) )*
        }
    };
}

api_routes! {
    get "/health" => health [ "public" ] "Liveness";
    get "/ready" => ready [ "public" ] "Readiness: the warehouse and the queue answer";
    get "/metrics" => metrics_text [ "public" ] "Prometheus metrics";
    get "/openapi.json" => openapi [ "public" ] "This document";
    post "/v1/tenants" => create_tenant [ "platform" ] "Create a tenant";
    get "/v1/pipelines" => list_pipelines [ "viewer" ] "List pipelines";
    post "/v1/pipelines" => create_pipeline [ "admin" ] "Create a pipeline (the pipeline file's fields as JSON; secrets write-only)";
    get "/v1/pipelines/{name}" => get_pipeline [ "viewer" ] "Read a pipeline (secrets named, never shown)";
    put "/v1/pipelines/{name}" => put_pipeline [ "admin" ] "Replace a pipeline; secrets left out keep their values";
    delete "/v1/pipelines/{name}" => delete_pipeline [ "admin" ] "Delete a pipeline";
    get "/v1/pipelines/{name}/health" => pipeline_health [ "viewer" ] "Check the pipeline's source";
    post "/v1/pipelines/{name}/sync" => sync_pipeline [ "operator" ] "Queue a sync: 202 with the run; Idempotency-Key honoured; joins a queued sync, or queues one behind a running sync";
    get "/v1/connectors/status" => connectors_status [ "viewer" ] "Every pipeline's health, last run, last success and next scheduled run";
    get "/v1/runs" => list_runs [ "viewer" ] "List runs (pipeline, status, from, to; paged by cursor)";
    get "/v1/runs/{id}" => get_run [ "viewer" ] "A run's accounting and quarantine counts per rule; for a job's id, the job whole (counts over its attempts) with each attempt beneath";
    get "/v1/quarantine" => list_quarantine [ "analyst" ] "List quarantined rows (run_id, pipeline, entity, rule, field, status; paged by cursor)";
    get "/v1/quarantine/stats" => quarantine_stats [ "analyst" ] "Quarantined rows by rule, field and status";
    post "/v1/quarantine/retry" => retry_batch [ "admin" ] "Replay rows by ids or by filter as one run: 202";
    get "/v1/quarantine/{id}" => get_quarantined [ "analyst" ] "A quarantined row: raw values, errors, position";
    patch "/v1/quarantine/{id}" => fix_quarantined [ "admin" ] "Fix raw values ({\"raw\": {...}}); audited before/after";
    post "/v1/quarantine/{id}/retry" => retry_quarantined [ "admin" ] "Replay one row: 202";
    post "/v1/quarantine/{id}/ignore" => ignore_quarantined [ "admin" ] "Set a row aside with a reason";
    get "/v1/dead-letters" => list_dead_letters [ "operator" ] "List dead jobs";
    get "/v1/dead-letters/{id}" => get_dead_letter [ "operator" ] "A dead job with every attempt";
    post "/v1/dead-letters/{id}/replay" => replay_dead_letter [ "admin" ] "Queue a dead sync again, once: 202";
    get "/v1/keys" => list_keys [ "admin" ] "List API keys (a platform key: platform keys)";
    post "/v1/keys" => create_key [ "admin" ] "Make an API key; shown once";
    delete "/v1/keys/{id}" => revoke_key [ "admin" ] "Revoke an API key";
    get "/v1/audit" => audit_log [ "admin" ] "The audit log, newest first";
    get "/v1/finance/dashboard" => dashboard [ "analyst" ] "Per currency: cash flow, AR/AP aging, profitability and the anomaly count";
    get "/v1/finance/anomalies" => anomalies [ "analyst" ] "Anomalies (outliers, duplicate doc numbers, overpayments), paged by cursor";
    get "/v1/finance/ar-aging" => ar_aging [ "analyst" ] "AR aging as of a date per currency, with per-customer rows";
    get "/v1/finance/ap-aging" => ap_aging [ "analyst" ] "AP aging as of a date per currency, with per-vendor rows";
    get "/v1/finance/profitability" => profitability [ "analyst" ] "Profitability over from..to per currency: revenue, cogs, gross profit and margin, expenses, net profit, and monthly";
    get "/v1/finance/cash-flow" => cash_flow [ "analyst" ] "Cash flow over from..to per currency: inflow, outflow, net, and monthly";
    // Registered apart, with its own body limit:
    @apart
    post "/v1/pipelines/{name}/files" [ "operator" ] "Upload a CSV/XLSX file (multipart field `file`, up to the upload limit) and queue its sync: 202; the same file again names the earlier run";
}

/// Every route, on `state`.
pub fn router<W: Store>(state: Arc<AppState<W>>) -> Router {
    let body_limit = state.body_limit;
    // The upload route has its own, larger limit (plus room for the multipart framing).
    let upload = Router::new().route(
        "/v1/pipelines/{name}/files",
        axum::routing::post(upload_file::<W>).layer(DefaultBodyLimit::max(
            state.upload_limit.saturating_add(64 * 1024),
        )),
    );
    add_routes(Router::new())
        .layer(DefaultBodyLimit::max(body_limit))
        .merge(upload)
        .merge(console::router(state.clone()))
        .route_layer(axum::middleware::from_fn(metrics::track))
        .layer(axum::middleware::from_fn(request_id::request_id))
        .with_state(state)
}

/// The OpenAPI 3.1 document of [`ROUTES`].
pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let params: Vec<serde_json::Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        // Prometheus' text exposition format; everything else answers JSON.
        let media = if r.path == "/metrics" {
            "text/plain"
        } else {
            "application/json"
        };
        let mut op = json!({
            "summary": r.summary,
            "description": format!("Least role: {}.", r.role),
            "responses": {
                "2XX": { "description": "Success", "content": { media: {} } },
                "default": { "description": "An error", "content": {
                    "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } } },
            },
        });
        if !params.is_empty() {
            op["parameters"] = json!(params);
        }
        if r.role == "public" {
            op["security"] = json!([]);
        }
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "sluice", "version": env!("CARGO_PKG_VERSION") },
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": { "Problem": {
                "type": "object",
                "required": ["type", "title", "status", "correlation_id"],
                "properties": {
                    "type": { "type": "string" }, "title": { "type": "string" },
                    "status": { "type": "integer" }, "detail": { "type": "string" },
                    "correlation_id": { "type": "string" },
                },
            } },
        },
    })
}

async fn openapi<W: Store>(_: State<Arc<AppState<W>>>) -> impl IntoResponse {
    axum::Json(openapi_document())
}

async fn health<W: Store>(_: State<Arc<AppState<W>>>) -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Ready when the warehouse and the queue answer.
async fn ready<W: Store>(State(s): State<Arc<AppState<W>>>) -> Result<impl IntoResponse, ApiError> {
    s.warehouse.tenants().await?;
    s.queues.depth(sluice_workers::QueueName::Sync).await?;
    Ok(axum::Json(json!({ "status": "ready" })))
}

async fn metrics_text<W: Store>(_: State<Arc<AppState<W>>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        sluice_workers::metrics::render(),
    )
}

/// Serves `GET /metrics` alone on `listener`: the metrics of a `sluice worker` or
/// `sluice scheduler` process, which serves no API.
pub async fn serve_metrics(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                sluice_workers::metrics::render(),
            )
        }),
    );
    axum::serve(listener, app).await
}

/// Serves the API on `addr` until `shutdown` completes.
pub async fn serve<W: Store>(
    state: Arc<AppState<W>>,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "API listening");
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
