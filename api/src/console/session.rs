//! Console sessions: signing in with an API key, the session cookie, and CSRF tokens.
//!
//! The session id is 32 random bytes in an `HttpOnly`, `SameSite=Strict` cookie (`Secure`
//! when the request came over TLS); the store keeps only its SHA-256. A session ends after
//! [`IDLE`] without a request, [`ABSOLUTE`] after signing in, at `Sign out`, or when its key
//! is revoked (the key is looked up on every request). Every state-changing request made
//! with the cookie carries a CSRF token derived from the session id, which a page of
//! another origin cannot read; it must never be accepted without one.

use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use chrono::{Duration, Utc};
use sha2::{Digest, Sha256};
use sluice_engine::Store;
use sluice_engine::TenantSlug;
use sluice_engine::control::{ConsoleSession, hash_key, random_hex};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// The cookie's name.
pub const COOKIE: &str = "sluice_session";

/// A session unused this long is over.
pub const IDLE: Duration = Duration::minutes(30);

/// A session this old is over, used or not.
pub const ABSOLUTE: Duration = Duration::hours(12);

/// The session's last use is written at most this often (not on every request).
const TOUCH_EVERY: Duration = Duration::seconds(60);

/// The header a script sends the CSRF token in (forms send the field `csrf`).
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The CSRF token of a session: a hash of its id under a label of its own, so the token
/// reveals nothing of the id and cannot be computed without it.
pub fn csrf_token(session_id: &str) -> String {
    Sha256::digest(format!("sluice-console-csrf:{session_id}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The session id the request's cookie carries, if any.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether the request reached us over TLS (directly or through a proxy that says so).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value that stores `id`.
pub fn set_cookie(id: &str, headers: &HeaderMap) -> String {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        ABSOLUTE.num_seconds()
    )
}

/// The `Set-Cookie` value that removes the cookie.
pub fn clear_cookie(headers: &HeaderMap) -> String {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// Starts a session for the key with `prefix`; returns the new session id (for the cookie).
pub async fn start<W: Store>(state: &AppState<W>, prefix: &str) -> Result<String, ApiError> {
    let id = random_hex(32);
    let now = Utc::now();
    state
        .warehouse
        .start_session(
            &ConsoleSession {
                id_hash: hash_key(&id),
                key_prefix: prefix.to_string(),
                created_at: now,
                last_seen_at: now,
            },
            now - IDLE,
        )
        .await?;
    Ok(id)
}

/// Ends the session with `id`.
pub async fn end<W: Store>(state: &AppState<W>, id: &str) -> Result<(), ApiError> {
    state.warehouse.end_session(&hash_key(id)).await?;
    Ok(())
}

/// A signed-in browser: who it is and its session's CSRF token.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The key that signed in, as the API sees it.
    pub caller: Caller,
    /// The key's tenant.
    pub tenant: TenantSlug,
    /// The token every state-changing form must carry.
    pub csrf: String,
}

impl SignedIn {
    /// Refuses a state-changing request whose token is not the session's.
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), ApiError> {
        match presented {
            Some(t) if sluice_engine::control::same_hash(t, &self.csrf) => Ok(()),
            _ => Err(ApiError::forbidden(
                "the form's CSRF token is missing or not this session's: reload the page and try again",
            )),
        }
    }
}

/// The live session of the request's cookie, if there is one.
pub async fn signed_in<W: Store>(
    state: &AppState<W>,
    headers: &HeaderMap,
) -> Result<Option<SignedIn>, ApiError> {
    let Some(id) = session_id(headers) else {
        return Ok(None);
    };
    let id_hash = hash_key(&id);
    let Some(session) = state.warehouse.session(&id_hash).await? else {
        return Ok(None);
    };
    let now = Utc::now();
    if now - session.last_seen_at > IDLE || now - session.created_at > ABSOLUTE {
        state.warehouse.end_session(&id_hash).await?;
        return Ok(None);
    }
    let Some(key) = state.warehouse.key_by_prefix(&session.key_prefix).await? else {
        return Ok(None);
    };
    if key.revoked_at.is_some() {
        state.warehouse.end_session(&id_hash).await?;
        return Ok(None);
    }
    let Some(tenant) = key
        .tenant
        .as_deref()
        .and_then(|t| TenantSlug::parse(t).ok())
    else {
        return Ok(None);
    };
    if now - session.last_seen_at > TOUCH_EVERY {
        state.warehouse.touch_session(&id_hash, now).await?;
    }
    Ok(Some(SignedIn {
        caller: Caller {
            key_id: key.id,
            tenant: Some(tenant.clone()),
            role: key.role,
        },
        tenant,
        csrf: csrf_token(&id),
    }))
}

/// The API's view of a cookie: the caller of a live session; for any method but GET and
/// HEAD only with the session's CSRF token in [`CSRF_HEADER`].
pub async fn api_caller<W: Store>(
    state: &AppState<W>,
    parts: &Parts,
) -> Result<Option<Caller>, ApiError> {
    let Some(user) = signed_in(state, &parts.headers).await? else {
        return Ok(None);
    };
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        user.check_csrf(parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()))?;
    }
    Ok(Some(user.caller))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_read_only_in_its_own_shape() {
        let id = "a".repeat(64);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("theme=dark; {COOKIE}={id}; other=1")
                .parse()
                .expect("header"),
        );
        assert_eq!(session_id(&h), Some(id.clone()));
        h.insert(
            header::COOKIE,
            format!("{COOKIE}=../../etc").parse().expect("header"),
        );
        assert_eq!(session_id(&h), None);
        assert_ne!(csrf_token(&id), csrf_token(&"b".repeat(64)));
        assert!(!csrf_token(&id).contains(&id));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_behind_tls() {
        let plain = set_cookie("x", &HeaderMap::new());
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(!plain.contains("Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().expect("header"));
        assert!(set_cookie("x", &h).ends_with("; Secure"));
        assert!(clear_cookie(&h).contains("Max-Age=0"));
    }
}
