//! The HTTP API (axum, JSON, under `/v1`): bearer API keys scoped to a tenant with a role,
//! errors as `application/problem+json` with a correlation id, `X-Request-Id` on every
//! response, per-key rate limits, body limits. Served by `sluice serve` next to the
//! workers and the scheduler.

pub mod auth;
pub mod error;
pub mod metrics;
pub mod request_id;
pub mod routes;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;

pub use state::{AppState, Store};

use crate::error::ApiError;
use crate::routes as r;

/// Every route, on `state`.
pub fn router<W: Store>(state: Arc<AppState<W>>) -> Router {
    let body_limit = state.body_limit;
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready::<W>))
        .route("/metrics", get(metrics_text))
        .route(
            "/v1/pipelines",
            get(r::list_pipelines::<W>).post(r::create_pipeline::<W>),
        )
        .route(
            "/v1/pipelines/{name}",
            get(r::get_pipeline::<W>)
                .put(r::put_pipeline::<W>)
                .delete(r::delete_pipeline::<W>),
        )
        .route("/v1/pipelines/{name}/health", get(r::pipeline_health::<W>))
        .route("/v1/pipelines/{name}/sync", post(r::sync_pipeline::<W>))
        .route("/v1/runs", get(r::list_runs::<W>))
        .route("/v1/runs/{id}", get(r::get_run::<W>))
        .route("/v1/dead-letters", get(r::list_dead_letters::<W>))
        .route("/v1/dead-letters/{id}", get(r::get_dead_letter::<W>))
        .route(
            "/v1/dead-letters/{id}/replay",
            post(r::replay_dead_letter::<W>),
        )
        .route("/v1/quarantine", get(r::list_quarantine::<W>))
        .route("/v1/quarantine/stats", get(r::quarantine_stats::<W>))
        .route("/v1/quarantine/retry", post(r::retry_batch::<W>))
        .route(
            "/v1/quarantine/{id}",
            get(r::get_quarantined::<W>).patch(r::fix_quarantined::<W>),
        )
        .route("/v1/quarantine/{id}/retry", post(r::retry_quarantined::<W>))
        .route(
            "/v1/quarantine/{id}/ignore",
            post(r::ignore_quarantined::<W>),
        )
        .route("/v1/keys", get(r::list_keys::<W>).post(r::create_key::<W>))
        .route("/v1/keys/{id}", axum::routing::delete(r::revoke_key::<W>))
        .route("/v1/audit", get(r::audit_log::<W>))
        .layer(DefaultBodyLimit::max(body_limit))
        .route_layer(axum::middleware::from_fn(metrics::track))
        .layer(axum::middleware::from_fn(request_id::request_id))
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Ready when the warehouse and the queue answer.
async fn ready<W: Store>(State(s): State<Arc<AppState<W>>>) -> Result<impl IntoResponse, ApiError> {
    s.warehouse.tenants().await?;
    s.queues.depth(sluice_workers::QueueName::Sync).await?;
    Ok(axum::Json(json!({ "status": "ready" })))
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        sluice_workers::metrics::render(),
    )
}

/// Serves the API on `addr` until `shutdown` completes.
pub async fn serve<W: Store>(
    state: Arc<AppState<W>>,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
