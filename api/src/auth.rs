//! Who is calling: a bearer API key (or a console session's cookie, see
//! [`crate::console::session`]), looked up by its prefix and checked against its stored
//! hash; revoked and malformed keys get 401; a key over its rate (see [`crate::rate_limit`])
//! gets 429 with `Retry-After`.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use sluice_engine::TenantSlug;
use sluice_engine::control::{Role, hash_key, key_prefix, same_hash};

use crate::error::ApiError;
use sluice_engine::Store;

use crate::rate_limit::FAILED_AUTH;
use crate::state::AppState;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's id (the actor in the audit log).
    pub key_id: String,
    /// The key's tenant; none for a platform key.
    pub tenant: Option<TenantSlug>,
    /// What it may do.
    pub role: Role,
}

impl Caller {
    /// The caller's tenant, requiring at least `role` (tenant keys only).
    pub fn tenant_with(&self, role: Role) -> Result<&TenantSlug, ApiError> {
        let tenant = self.tenant.as_ref().ok_or_else(|| {
            ApiError::forbidden("a platform key only provisions tenants and keys")
        })?;
        if self.role < role {
            return Err(ApiError::forbidden(format!(
                "this needs the {} role or higher; the key is {}",
                role.as_str(),
                self.role.as_str()
            )));
        }
        Ok(tenant)
    }
}

impl<W: Store> FromRequestParts<Arc<AppState<W>>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState<W>>,
    ) -> Result<Self, Self::Rejection> {
        let client = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
        // Failed authentications are counted per address; past the budget they get 429
        // instead of 401. A valid key is never refused for what others at the same
        // address (a NAT, a proxy) guessed.
        let failures = format!("auth-failures:{client}");
        // A browser signed in to the console calls the API with its session cookie (and,
        // for changes, the session's CSRF token); a bearer key takes precedence.
        if !parts.headers.contains_key(header::AUTHORIZATION)
            && let Some(caller) = crate::console::session::api_caller(state, parts).await?
        {
            if let Err(secs) = state.buckets.take(&caller.key_id, state.rate) {
                return Err(too_many(secs, "rate limit of this key exceeded"));
            }
            return Ok(caller);
        }
        let key = match authenticate(parts, state).await {
            Ok(key) => key,
            Err(e) if e.status == axum::http::StatusCode::UNAUTHORIZED => {
                if let Err(secs) = state.auth_failures.take(&failures, FAILED_AUTH) {
                    return Err(too_many(
                        secs,
                        "too many requests with a missing or invalid API key from this address",
                    ));
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if let Err(secs) = state.buckets.take(&key.id, state.rate) {
            return Err(too_many(secs, "rate limit of this key exceeded"));
        }
        let tenant = key
            .tenant
            .as_deref()
            .map(TenantSlug::parse)
            .transpose()
            .map_err(ApiError::internal)?;
        Ok(Caller {
            key_id: key.id,
            tenant,
            role: key.role,
        })
    }
}

fn too_many(secs: u64, what: &str) -> ApiError {
    let mut e = ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        format!("{what}; retry in {secs} s"),
    );
    e.retry_after = Some(secs);
    e
}

/// The stored key the request presents, if it is valid and not revoked.
async fn authenticate<W: Store>(
    parts: &Parts,
    state: &AppState<W>,
) -> Result<sluice_engine::control::ApiKeyRecord, ApiError> {
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("send an API key: Authorization: Bearer slk_..."))?
        .trim();
    verify_key(state, presented).await
}

/// The stored key `presented` is, if it is valid and not revoked (the API's bearer keys
/// and the console's sign-in).
pub async fn verify_key<W: Store>(
    state: &AppState<W>,
    presented: &str,
) -> Result<sluice_engine::control::ApiKeyRecord, ApiError> {
    let invalid = || ApiError::unauthorized("the API key is not valid");
    let prefix = key_prefix(presented).ok_or_else(invalid)?;
    let key = state
        .warehouse
        .key_by_prefix(prefix)
        .await?
        .ok_or_else(invalid)?;
    if !same_hash(&hash_key(presented), &key.hash) {
        return Err(invalid());
    }
    if key.revoked_at.is_some() {
        return Err(ApiError::unauthorized("the API key was revoked"));
    }
    Ok(key)
}
