//! HTTP metrics, in the program's one Prometheus registry: requests by route, method and
//! status, and latency by route and method. The route is the matched pattern
//! (`/v1/pipelines/{name}`), never the raw path, so ids do not explode the label set.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

struct HttpMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

static HTTP: OnceLock<Option<HttpMetrics>> = OnceLock::new();

fn http() -> Option<&'static HttpMetrics> {
    HTTP.get_or_init(|| {
        let registry = &sluice_workers::metrics::metrics().registry;
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .ok()?;
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP latency by route").buckets(
                vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            ),
            &["route", "method"],
        )
        .ok()?;
        registry.register(Box::new(requests.clone())).ok()?;
        registry.register(Box::new(latency.clone())).ok()?;
        Some(HttpMetrics { requests, latency })
    })
    .as_ref()
}

/// The middleware.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    if let Some(m) = http() {
        m.requests
            .with_label_values(&[&route, &method, resp.status().as_str()])
            .inc();
        m.latency
            .with_label_values(&[&route, &method])
            .observe(started.elapsed().as_secs_f64());
    }
    resp
}
