//! Errors as `application/problem+json` (RFC 9457). The request-id middleware adds the
//! `correlation_id` to every problem, and turns any other error response (a rejected
//! extractor, an unknown route) into a problem too.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_engine::{EngineError, ErrorKind};

/// The media type of every error.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub detail: String,
    /// Seconds to wait, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `detail`.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    /// 404: also what a key gets for another tenant's resource.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{} not found", what.into()))
    }

    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, detail)
    }

    /// 401.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, detail)
    }

    /// 500 for a failure the client cannot fix; the detail stays generic.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e.kind() {
            ErrorKind::NotFound => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            ErrorKind::Config | ErrorKind::Input => ApiError::bad_request(e.to_string()),
            k if k.is_transient() => {
                tracing::warn!(error = %e, "dependency unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the warehouse is unavailable; retry later",
                )
            }
            _ => ApiError::internal(e),
        }
    }
}

impl From<sluice_workers::WorkerError> for ApiError {
    fn from(e: sluice_workers::WorkerError) -> Self {
        use sluice_workers::WorkerErrorKind;
        match e.kind() {
            WorkerErrorKind::NotFound => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            WorkerErrorKind::Conflict => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            WorkerErrorKind::Job => ApiError::bad_request(e.to_string()),
            WorkerErrorKind::Queue => {
                tracing::warn!(error = %e, "queue unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the job queue is unavailable; retry later",
                )
            }
        }
    }
}

impl From<sluice_pipelines::PipelineError> for ApiError {
    fn from(e: sluice_pipelines::PipelineError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

/// The problem document of `status` with `detail` (the correlation id is added later).
pub fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = problem(self.status, &self.detail);
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}
