//! The web console: server-rendered pages (maud, compiled into the binary) on the API's
//! origin, for operators and admins who never open a terminal. Pages read and act through
//! the same functions as the `/v1` routes, so a fix made here is the API's fix, audited
//! alike. One table ([`PAGES`]) declares every page and form: its route, its least role and
//! whether the navigation shows it; the guard enforces the role and, for every form, the
//! session's CSRF token from that table, so no page can forget either. Charts are SVG drawn
//! here, each beside a table of the same figures. The only script is `console.js`
//! (embedded): theme, select-all, upload progress, live run counts; every page works
//! without it except the upload's progress.

pub mod charts;
pub mod pages;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use sluice_engine::Store;
use sluice_engine::control::Role;

use crate::error::ApiError;
use crate::state::AppState;
use session::SignedIn;

/// A console route as the table declares it.
#[derive(Debug, Clone, Copy)]
pub struct PageDoc {
    /// `get` or `post`.
    pub method: &'static str,
    /// The route, e.g. `/quarantine/{id}`.
    pub path: &'static str,
    /// The least role that may open or submit it.
    pub role: Role,
    /// Its title (the navigation's label for pages in it).
    pub title: &'static str,
    /// Whether the navigation lists it.
    pub nav: bool,
}

/// One list builds both the router and [`PAGES`].
macro_rules! console_pages {
    ($( $method:ident $path:literal => $($handler:ident)::+ [$role:ident] $title:literal $($nav:ident)?; )*) => {
        /// Every page and form of the console.
        pub const PAGES: &[PageDoc] = &[
            $( PageDoc { method: stringify!($method), path: $path, role: Role::$role,
                         title: $title, nav: console_pages!(@nav $($nav)?) }, )*
        ];

        fn add_pages<W: Store>(router: Router<Arc<AppState<W>>>) -> Router<Arc<AppState<W>>> {
            router $( .route($path, axum::routing::$method($($handler)::+::<W>)) )*
        }
    };
    (@nav nav) => { true };
    (@nav) => { false };
}

console_pages! {
    get "/" => pages::overview::page [Viewer] "Overview" nav;
    post "/pipelines/{name}/sync" => pages::overview::sync_now [Operator] "Sync now";
    get "/runs" => pages::runs::list [Viewer] "Runs" nav;
    get "/runs/{id}" => pages::runs::show [Viewer] "Run";
    get "/quarantine" => pages::quarantine::list [Analyst] "Quarantine" nav;
    post "/quarantine/retry" => pages::quarantine::retry_many [Admin] "Retry rows";
    get "/quarantine/{id}" => pages::quarantine::show [Analyst] "Quarantined row";
    post "/quarantine/{id}/save" => pages::quarantine::save [Admin] "Save a fix";
    post "/quarantine/{id}/retry" => pages::quarantine::retry [Admin] "Retry a row";
    post "/quarantine/{id}/ignore" => pages::quarantine::ignore [Admin] "Ignore a row";
    get "/dead-letters" => pages::dead_letters::list [Operator] "Dead letters" nav;
    get "/dead-letters/{id}" => pages::dead_letters::show [Operator] "Dead letter";
    post "/dead-letters/{id}/replay" => pages::dead_letters::replay [Admin] "Replay";
    get "/finance" => pages::finance::page [Analyst] "Finance" nav;
    get "/finance/aging/{side}" => pages::finance::aging [Analyst] "Aging by counterparty";
    get "/finance/documents/{kind}/{id}" => pages::finance::document [Analyst] "Document";
    get "/upload" => pages::upload::page [Operator] "Upload" nav;
    get "/audit" => pages::admin::audit [Admin] "Audit log" nav;
    get "/keys" => pages::admin::keys [Admin] "Keys" nav;
    post "/keys" => pages::admin::create_key [Admin] "Create a key";
    post "/keys/{id}/revoke" => pages::admin::revoke_key [Admin] "Revoke a key";
    get "/webhooks" => pages::webhooks::list [Operator] "Webhooks" nav;
    post "/webhooks" => pages::webhooks::create [Admin] "Make a webhook endpoint";
    get "/webhooks/{id}" => pages::webhooks::show [Operator] "Webhook endpoint";
    post "/webhooks/{id}/test" => pages::webhooks::test [Admin] "Send a test event";
    post "/webhooks/{id}/rotate" => pages::webhooks::rotate [Admin] "Rotate a webhook secret";
    post "/webhooks/{id}/delete" => pages::webhooks::delete [Admin] "Delete a webhook endpoint";
    post "/webhook-deliveries/{id}/replay" => pages::webhooks::replay [Admin] "Send a delivery again";
}

/// The console's routes (pages, sign-in, assets), to merge beside the API's.
pub fn router<W: Store>(state: Arc<AppState<W>>) -> Router<Arc<AppState<W>>> {
    add_pages(Router::new())
        .route_layer(axum::middleware::from_fn_with_state(state, guard::<W>))
        .route(
            "/sign-in",
            axum::routing::get(pages::sign_in::form::<W>).post(pages::sign_in::submit::<W>),
        )
        .route(
            "/sign-out",
            axum::routing::post(pages::sign_in::sign_out::<W>),
        )
        .route("/assets/console.css", axum::routing::get(css))
        .route("/assets/console.js", axum::routing::get(js))
}

/// The page of the table that `method` and the matched `path` name.
fn page_of(method: &Method, path: &str) -> Option<&'static PageDoc> {
    PAGES
        .iter()
        .find(|p| p.path == path && p.method.eq_ignore_ascii_case(method.as_str()))
}

/// Largest form accepted (a quarantined row's values, a selection of ids).
const FORM_LIMIT: usize = 1 << 20;

/// Every console route passes here: a session or the sign-in page; the page's role; for a
/// form, the session's CSRF token (field `csrf`). The signed-in user goes on as an
/// extension.
async fn guard<W: Store>(
    State(state): State<Arc<AppState<W>>>,
    matched: MatchedPath,
    req: Request,
    next: Next,
) -> Response {
    let Some(page) = page_of(req.method(), matched.as_str()) else {
        return PageError(ApiError::not_found("page")).into_response();
    };
    let user = match session::signed_in(&state, req.headers()).await {
        Ok(Some(user)) => user,
        Ok(None) => return sign_in_redirect(&req),
        Err(e) => return PageError(e).into_response(),
    };
    if user.caller.role < page.role {
        return PageError(ApiError::forbidden(format!(
            "{} needs the {} role; this key is {}",
            page.title,
            page.role.as_str(),
            user.caller.role.as_str()
        )))
        .into_response();
    }
    let mut req = req;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = to_bytes(body, FORM_LIMIT).await else {
            return PageError(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the form is too large",
            ))
            .into_response();
        };
        let token = form_value(&form_pairs(&bytes), "csrf");
        if let Err(e) = user.check_csrf(token.as_deref()) {
            tracing::warn!(path = %parts.uri.path(), "console form without the session's CSRF token");
            return PageError(e).into_response();
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(user);
    next.run(req).await
}

fn sign_in_redirect(req: &Request) -> Response {
    let next = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let target = if req.method() == Method::GET && next != "/" {
        format!("/sign-in?next={}", url_encode(next))
    } else {
        "/sign-in".to_string()
    };
    axum::response::Redirect::to(&target).into_response()
}

/// The pairs of a URL-encoded form, in order.
pub fn form_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|b| *b == b'=') {
            Some(i) => (url_decode(&p[..i]), url_decode(&p[i + 1..])),
            None => (url_decode(p), String::new()),
        })
        .collect()
}

/// The first value of field `name` in a form, trimmed; none when absent or blank.
pub fn form_value(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The names of the tenant's pipelines (for the filters' choices).
pub async fn pipeline_names<W: Store>(
    s: &AppState<W>,
    tenant: &sluice_engine::TenantSlug,
) -> Result<Vec<String>, PageError> {
    Ok(s.warehouse
        .pipelines(tenant)
        .await?
        .into_iter()
        .map(|p| p.name)
        .collect())
}

fn url_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (_, Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes `s` for a query string.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string of the non-empty pairs.
pub fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", url_encode(v)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// An error as a page (the API's problem, for people).
#[derive(Debug)]
pub struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl From<sluice_engine::EngineError> for PageError {
    fn from(e: sluice_engine::EngineError) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status;
        let title = status.canonical_reason().unwrap_or("Error");
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head { (head_tags(title)) }
                body class="bare" {
                    main class="narrow" {
                        h1 { (status.as_u16()) " " (title) }
                        p class="problem" role="alert" { (self.0.detail) }
                        p { a href="/" { "Back to the overview" } }
                    }
                }
            }
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body.into_string(),
        )
            .into_response()
    }
}

/// What a page handler answers.
pub type PageResult = Result<Response, PageError>;

fn head_tags(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        meta name="color-scheme" content="light dark";
        title { (title) " · sluice" }
        link rel="stylesheet" href="/assets/console.css";
        script src="/assets/console.js" defer {}
    }
}

/// A notice shown after a form was handled (from a fixed list: never text from the URL).
pub fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "saved" => "Saved. The row is fixed and ready to retry.",
        "retried" => "Queued: the replay run is below.",
        "ignored" => "The row is set aside as ignored.",
        "synced" => "Sync queued.",
        "joined" => "A sync of this pipeline was already waiting to start: this is it.",
        "replayed" => "Queued again: the run is below.",
        "revoked" => "The key is revoked; its sessions have ended.",
        "test_sent" => "A webhook.test event is queued for this endpoint.",
        "webhook_deleted" => "The endpoint is deleted; nothing more is sent to it.",
        "delivery_queued" => "The delivery is queued again, with the same webhook-id.",
        _ => return None,
    })
}

/// The page frame: navigation (only what the role may open), the user, theme and sign-out.
pub fn layout(
    user: &SignedIn,
    title: &str,
    current: &str,
    notice: Option<&str>,
    body: Markup,
) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { (head_tags(title)) }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header class="top" {
                    a class="brand" href="/" { "sluice" }
                    nav aria-label="Main" {
                        ul {
                            @for p in PAGES.iter().filter(|p| p.nav && user.caller.role >= p.role) {
                                li {
                                    a href=(p.path) aria-current=[(p.path == current).then_some("page")] { (p.title) }
                                }
                            }
                        }
                    }
                    div class="who" {
                        span class="tenant" title="Tenant" { (user.tenant.as_str()) }
                        span class="role" title="Role of the key" { (user.caller.role.as_str()) }
                        button type="button" class="ghost" data-theme-toggle aria-label="Switch between light and dark theme" { "Theme" }
                        form method="post" action="/sign-out" {
                            input type="hidden" name="csrf" value=(user.csrf);
                            button type="submit" class="ghost" { "Sign out" }
                        }
                    }
                }
                main id="main" {
                    @if let Some(text) = notice.and_then(notice_text) {
                        p class="notice" role="status" { (text) }
                    }
                    (body)
                }
            }
        }
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page.into_string(),
    )
        .into_response()
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(user: &SignedIn) -> Markup {
    html! { input type="hidden" name="csrf" value=(user.csrf); }
}

/// A status word as a badge (its text is the status; colour only repeats it).
pub fn badge(word: &str) -> Markup {
    html! { span class={ "badge " (word) } { (word) } }
}

/// An instant as people read it (UTC, to the second).
pub fn when(at: &chrono::DateTime<chrono::Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S")) } }
}

/// A UUIDv7's distinguishing end (its start is the time, shared by rows of one run).
pub fn short_id(id: &str) -> String {
    match id.len().checked_sub(12) {
        Some(start) if id.is_char_boundary(start) && start > 0 => format!("…{}", &id[start..]),
        _ => id.to_string(),
    }
}

/// An instant given as RFC 3339 text (as the JSON shapes carry it), as [`when`] shows it.
pub fn when_text(text: &str) -> Markup {
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(at) => when(&at.with_timezone(&chrono::Utc)),
        Err(_) => html! { (text) },
    }
}

/// Whether `user` may use the page or form at `path` with `method` (to hide what it may not).
pub fn may(user: &SignedIn, method: &str, path: &str) -> bool {
    PAGES
        .iter()
        .find(|p| p.path == path && p.method == method)
        .is_some_and(|p| user.caller.role >= p.role)
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("assets/console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("assets/console.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_like_browsers_send_them() {
        let pairs = form_pairs(b"csrf=ab&raw.Amount+Due=1%2C200.50&x=%zz&empty=&flag");
        assert_eq!(
            pairs,
            vec![
                ("csrf".into(), "ab".into()),
                ("raw.Amount Due".into(), "1,200.50".into()),
                ("x".into(), "%zz".into()),
                ("empty".into(), "".into()),
                ("flag".into(), "".into()),
            ]
        );
        assert_eq!(url_encode("/runs?a=b c"), "%2Fruns%3Fa%3Db%20c");
    }

    #[test]
    fn every_form_is_a_post_and_every_page_a_get_with_a_title() {
        for p in PAGES {
            assert!(matches!(p.method, "get" | "post"), "{}", p.path);
            assert!(!p.title.is_empty());
            assert!(!(p.nav && p.method == "post"), "{}", p.path);
        }
    }
}
