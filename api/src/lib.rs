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
pub mod openapi;
pub mod rate_limit;
pub mod request_id;
pub mod routes;
pub mod state;
pub mod upload;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;

use sluice_engine::Store;
pub use state::AppState;

use crate::error::ApiError;
use crate::openapi::{Conventions, Problem};
use crate::routes::*;
use crate::upload::{__path_upload_file, upload_file};
use crate::webhooks::*;

/// One list of handlers builds both the router and the OpenAPI document ([`ApiDoc`]):
/// each handler's `#[utoipa::path]` names its method and path, and the router serves it
/// there, so the document can never miss or misplace a route. The handlers after `@apart`
/// are served by [`router`] with their own layers and only documented here.
macro_rules! api_routes {
    ($( $handler:ident ),* $(,)? ; @apart $( $xhandler:ident ),* $(,)?) => { pastey::paste! {
        /// The OpenAPI document of every route (see [`openapi`]).
        #[derive(utoipa::OpenApi)]
        #[openapi(
            info(title = "sluice", description = "The sluice API: pipelines, syncs, runs, quarantine, dead letters, keys, webhooks and finance reports. Send an API key as `Authorization: Bearer <key>`; every error is `application/problem+json`."),
            paths( $( $handler, )* $( $xhandler, )* ),
            components(schemas(Problem)),
            modifiers(&Conventions),
        )]
        pub struct ApiDoc;

        /// How many operations the API serves.
        pub const OPERATIONS: usize = [$( stringify!($handler), )* $( stringify!($xhandler), )*].len();

        fn add_routes<W: Store>(router: Router<Arc<AppState<W>>>) -> Router<Arc<AppState<W>>> {
            router $(
                .route(
                    &<[<__path_ $handler>] as utoipa::Path>::path(),
                    on_methods(<[<__path_ $handler>] as utoipa::Path>::methods(), $handler::<W>),
                )
            )*
        }
    }};
}

/// `handler` on the methods its `#[utoipa::path]` names.
fn on_methods<H, T, S>(
    methods: Vec<utoipa::openapi::path::HttpMethod>,
    handler: H,
) -> axum::routing::MethodRouter<S>
where
    H: axum::handler::Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    use axum::routing::MethodFilter;
    use utoipa::openapi::path::HttpMethod;
    let filter = methods
        .into_iter()
        .map(|m| match m {
            HttpMethod::Get => MethodFilter::GET,
            HttpMethod::Post => MethodFilter::POST,
            HttpMethod::Put => MethodFilter::PUT,
            HttpMethod::Patch => MethodFilter::PATCH,
            HttpMethod::Delete => MethodFilter::DELETE,
            HttpMethod::Head => MethodFilter::HEAD,
            HttpMethod::Options => MethodFilter::OPTIONS,
            HttpMethod::Trace => MethodFilter::TRACE,
        })
        .reduce(MethodFilter::or)
        .expect("a route has a method");
    axum::routing::on(filter, handler)
}

api_routes! {
    health, ready, metrics_text, openapi_json,
    create_tenant,
    list_pipelines, create_pipeline, get_pipeline, put_pipeline, delete_pipeline,
    pipeline_health, sync_pipeline, connectors_status,
    list_runs, get_run,
    list_quarantine, quarantine_stats, retry_batch, get_quarantined, fix_quarantined,
    retry_quarantined, ignore_quarantined,
    list_dead_letters, get_dead_letter, replay_dead_letter,
    list_keys, create_key, revoke_key, audit_log,
    list_webhooks, create_webhook, get_webhook, delete_webhook, rotate_webhook_secret,
    test_webhook, list_deliveries, get_delivery, replay_delivery,
    dashboard, anomalies, ar_aging, ap_aging, profitability, cash_flow;
    // Registered apart by `router`, with its own body limit:
    @apart upload_file,
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

/// The OpenAPI 3.1 document, as `GET /openapi.json` serves it.
pub fn openapi_document() -> serde_json::Value {
    let mut doc =
        serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).expect("the document is JSON");
    openapi::flatten_tagged_branches(&mut doc);
    doc
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    summary = "This document",
    security(()),
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object))
)]
async fn openapi_json<W: Store>(_: State<Arc<AppState<W>>>) -> impl IntoResponse {
    axum::Json(openapi_document())
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "service",
    summary = "Liveness",
    security(()),
    responses((status = 200, description = "Alive", body = crate::openapi::Status))
)]
async fn health<W: Store>(_: State<Arc<AppState<W>>>) -> impl IntoResponse {
    axum::Json(crate::openapi::Status {
        status: "ok".into(),
    })
}

/// Ready when the warehouse and the queue answer.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "service",
    summary = "Readiness: the warehouse and the queue answer",
    security(()),
    responses((status = 200, description = "Ready", body = crate::openapi::Status))
)]
async fn ready<W: Store>(State(s): State<Arc<AppState<W>>>) -> Result<impl IntoResponse, ApiError> {
    s.warehouse.tenants().await?;
    s.queues.depth(sluice_workers::QueueName::Sync).await?;
    Ok(axum::Json(crate::openapi::Status {
        status: "ready".into(),
    }))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    summary = "Prometheus metrics",
    security(()),
    responses((status = 200, description = "The text exposition format", content_type = "text/plain", body = String))
)]
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
