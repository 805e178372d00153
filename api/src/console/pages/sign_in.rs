//! Signing in with an API key, and out. Failed attempts count against the address like the
//! API's (then 429); a platform key is refused (the console works inside one tenant); a
//! sign-in posted from another origin is refused.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, html};
use serde::Deserialize;
use sluice_engine::Store;

use crate::console::session;
use crate::console::{PageError, form_pairs, form_value, head_tags};
use crate::error::ApiError;
use crate::rate_limit::FAILED_AUTH;
use crate::state::AppState;

/// Query of the sign-in page.
#[derive(Debug, Deserialize)]
pub struct SignInQuery {
    next: Option<String>,
}

/// Where to go after signing in: a path of this site, else the overview.
fn safe_next(next: Option<&str>) -> &str {
    next.filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains('\\'))
        .unwrap_or("/")
}

fn sign_in_page(next: &str, problem: Option<&str>, status: StatusCode) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { (head_tags("Sign in")) }
            body class="bare" {
                main class="narrow sign-in" id="main" {
                    h1 { "sluice" }
                    p class="muted" { "Sign in with an API key of your tenant. An admin makes keys under Keys, or with " code { "sluice keys create" } "." }
                    @if let Some(p) = problem {
                        p class="problem" role="alert" { (p) }
                    }
                    form method="post" action="/sign-in" {
                        input type="hidden" name="next" value=(next);
                        label for="key" { "API key" }
                        input id="key" name="key" type="password" autocomplete="off" required autofocus
                            spellcheck="false" placeholder="slk_…";
                        button type="submit" class="primary" { "Sign in" }
                    }
                }
            }
        }
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page.into_string(),
    )
        .into_response()
}

/// `GET /sign-in`: the form (a signed-in browser goes on to the overview).
pub async fn form<W: Store>(
    State(state): State<Arc<AppState<W>>>,
    headers: HeaderMap,
    Query(q): Query<SignInQuery>,
) -> Response {
    if let Ok(Some(_)) = session::signed_in(&state, &headers).await {
        return Redirect::to(safe_next(q.next.as_deref())).into_response();
    }
    sign_in_page(safe_next(q.next.as_deref()), None, StatusCode::OK)
}

/// Whether a request's `Origin` (when the browser sent one) is this site.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, h)| h);
    origin_host.is_some() && origin_host == host
}

/// `POST /sign-in`: checks the key, starts a session, sets the cookie.
pub async fn submit<W: Store>(State(state): State<Arc<AppState<W>>>, req: Request) -> Response {
    let client = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let Ok(body) = axum::body::to_bytes(body, 64 * 1024).await else {
        return PageError(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the form is too large",
        ))
        .into_response();
    };
    let pairs = form_pairs(&body);
    let field = |name: &str| form_value(&pairs, name);
    let next = field("next");
    let next = safe_next(next.as_deref()).to_string();
    if !same_origin(&headers) {
        return PageError(ApiError::forbidden(
            "a sign-in from another site is refused",
        ))
        .into_response();
    }
    let presented = field("key").unwrap_or_default();
    let failures = format!("auth-failures:{client}");
    let key = match crate::auth::verify_key(&state, &presented).await {
        Ok(key) => key,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            if let Err(secs) = state.auth_failures.take(&failures, FAILED_AUTH) {
                return sign_in_page(
                    &next,
                    Some(&format!(
                        "Too many failed sign-ins from this address; try again in {secs} s."
                    )),
                    StatusCode::TOO_MANY_REQUESTS,
                );
            }
            tracing::info!(%client, "console sign-in with an invalid key");
            return sign_in_page(
                &next,
                Some("That key is not valid (or was revoked)."),
                StatusCode::UNAUTHORIZED,
            );
        }
        Err(e) => return PageError(e).into_response(),
    };
    let Some(tenant) = key
        .tenant
        .as_deref()
        .and_then(|t| sluice_engine::TenantSlug::parse(t).ok())
    else {
        return sign_in_page(
            &next,
            Some("A platform key provisions tenants; sign in with a key of a tenant."),
            StatusCode::FORBIDDEN,
        );
    };
    // A tenant exists by its keys; the embedded warehouse makes its file on first use, and
    // the console reads it from the first page on (a no-op where it exists).
    if let Err(e) = state
        .warehouse
        .provision_tenant(&tenant, tenant.as_str())
        .await
    {
        return PageError(e.into()).into_response();
    }
    let id = match session::start(&state, &key.prefix).await {
        Ok(id) => id,
        Err(e) => return PageError(e).into_response(),
    };
    tracing::info!(key = %key.id, "console sign-in");
    (
        [(header::SET_COOKIE, session::set_cookie(&id, &headers))],
        Redirect::to(&next),
    )
        .into_response()
}

/// `POST /sign-out`: ends the session (with the session's CSRF token).
pub async fn sign_out<W: Store>(
    State(state): State<Arc<AppState<W>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let user = match session::signed_in(&state, &headers).await {
        Ok(Some(user)) => user,
        Ok(None) => return Redirect::to("/sign-in").into_response(),
        Err(e) => return PageError(e).into_response(),
    };
    let token = form_value(&form_pairs(&body), "csrf");
    if let Err(e) = user.check_csrf(token.as_deref()) {
        return PageError(e).into_response();
    }
    if let Some(id) = session::session_id(&headers)
        && let Err(e) = session::end(&state, &id).await
    {
        return PageError(e).into_response();
    }
    (
        [(header::SET_COOKIE, session::clear_cookie(&headers))],
        Redirect::to("/sign-in"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_of_this_site_are_followed_after_signing_in() {
        assert_eq!(
            safe_next(Some("/runs?status=failed")),
            "/runs?status=failed"
        );
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
