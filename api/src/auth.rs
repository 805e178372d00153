//! Who is calling: a bearer API key, looked up by its prefix and checked against its stored
//! hash; revoked and malformed keys get 401. Each key has a token bucket: over the rate,
//! 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use sluice_engine::TenantSlug;
use sluice_engine::control::{Role, hash_key, key_prefix, same_hash};

use crate::error::ApiError;
use crate::state::{AppState, Store};

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

/// Token-bucket settings per key.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Requests a key may make at once.
    pub burst: f64,
    /// Requests per second refilled.
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            burst: 200.0,
            per_second: 100.0,
        }
    }
}

/// Buckets of every key seen.
#[derive(Debug, Default)]
pub struct Buckets(Mutex<HashMap<String, (f64, Instant)>>);

impl Buckets {
    /// Takes a token for `key`, or says how many seconds until one is there.
    pub fn take(&self, key: &str, limit: RateLimit) -> Result<(), u64> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, at) = map.entry(key.to_string()).or_insert((limit.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * limit.per_second).min(limit.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / limit.per_second.max(1e-9);
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}

impl<W: Store> FromRequestParts<Arc<AppState<W>>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState<W>>,
    ) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("send an API key: Authorization: Bearer slk_...")
            })?
            .trim();
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
        if let Err(secs) = state.buckets.take(&key.id, state.rate) {
            let mut e = ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!("rate limit of this key exceeded; retry in {secs} s"),
            );
            e.retry_after = Some(secs);
            return Err(e);
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
