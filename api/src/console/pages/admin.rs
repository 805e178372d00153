//! Admin pages: the audit log, and API keys (create: the key is shown once; revoke).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use maud::html;
use serde::Deserialize;
use sluice_engine::Store;
use sluice_engine::control::Role;

use crate::console::session::SignedIn;
use crate::console::{
    PageError, PageResult, csrf_field, form_pairs, form_value, layout, url_encode, when,
};
use crate::error::ApiError;
use crate::routes::{NewKeyBody, make_key, revoke};
use crate::state::AppState;

/// Query of the audit log.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
}

/// `GET /audit`: newest first.
pub async fn audit<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Query(q): Query<AuditQuery>,
) -> PageResult {
    let limit = 100;
    let entries = s.warehouse.audit_log(&user.tenant, q.before, limit).await?;
    let next = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    let keys = s.warehouse.keys(Some(&user.tenant)).await?;
    let actor = |id: &str| {
        keys.iter().find(|k| k.id == id).map_or_else(
            || id.to_string(),
            |k| {
                format!(
                    "{} ({})",
                    k.name.clone().unwrap_or_else(|| k.prefix.clone()),
                    k.role.as_str()
                )
            },
        )
    };
    let body = html! {
        h1 { "Audit log" }
        @if entries.is_empty() { p class="empty" { "Nothing recorded yet." } }
        @else {
            div class="table-wrap" {
            table class="data" {
                thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Detail" } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td class="small" { (when(&e.at)) }
                            td class="small" { (actor(&e.actor)) }
                            td { span class="rule" { (e.action) } }
                            td class="mono small" { (e.target) }
                            td { details { summary { "detail" } pre class="small" { (serde_json::to_string_pretty(&e.detail).unwrap_or_default()) } } }
                        }
                    }
                }
            }
            }
        }
        @if let Some(before) = next { p { a rel="next" href={ "/audit?before=" (before) } { "Older →" } } }
    };
    Ok(layout(&user, "Audit log", "/audit", None, body))
}

/// Query of the keys page.
#[derive(Debug, Deserialize)]
pub struct KeysQuery {
    notice: Option<String>,
}

fn keys_page(
    user: &SignedIn,
    keys: &[sluice_engine::control::ApiKeyRecord],
    made: Option<(&str, &str)>,
    notice: Option<&str>,
) -> axum::response::Response {
    let body = html! {
        h1 { "API keys" }
        @if let Some((secret, role)) = made {
            div class="notice" role="status" {
                p { strong { "New " (role) " key. Copy it now: it is shown once and never again." } }
                p { input class="mono secret" readonly value=(secret) aria-label="The new API key" size="80"; }
            }
        }
        form method="post" action="/keys" class="filters" {
            (csrf_field(user))
            label { "Role "
                select name="role" {
                    @for r in [Role::Viewer, Role::Analyst, Role::Operator, Role::Admin] { option value=(r.as_str()) { (r.as_str()) } }
                }
            }
            label { "Name " input name="name" placeholder="e.g. finance laptop"; }
            button type="submit" class="primary" { "Create key" }
        }
        div class="table-wrap" {
        table class="data" {
            thead { tr { th scope="col" { "Prefix" } th scope="col" { "Name" } th scope="col" { "Role" } th scope="col" { "Created" } th scope="col" { "Status" } th scope="col" { span class="sr-only" { "Actions" } } } }
            tbody {
                @for k in keys {
                    tr {
                        td class="mono" { (k.prefix) }
                        td { (k.name.clone().unwrap_or_default()) }
                        td { (k.role.as_str()) }
                        td class="small" { (when(&k.created_at)) }
                        td { @if let Some(at) = &k.revoked_at { span class="badge failed" { "revoked" } " " span class="small" { (when(at)) } } @else { span class="badge ok" { "active" } } }
                        td {
                            @if k.revoked_at.is_none() && k.id != user.caller.key_id {
                                form method="post" action={ "/keys/" (url_encode(&k.id)) "/revoke" } {
                                    (csrf_field(user))
                                    button type="submit" class="danger" aria-label={ "Revoke key " (k.prefix) } { "Revoke" }
                                }
                            } @else if k.id == user.caller.key_id { span class="muted small" { "this session's key" } }
                        }
                    }
                }
            }
        }
        }
    };
    layout(user, "Keys", "/keys", notice, body)
}

/// `GET /keys`
pub async fn keys<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Query(q): Query<KeysQuery>,
) -> PageResult {
    let keys = s.warehouse.keys(Some(&user.tenant)).await?;
    Ok(keys_page(&user, &keys, None, q.notice.as_deref()))
}

/// `POST /keys`: makes a key and shows it, once (this answer is not cached or redirected).
pub async fn create_key<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    body: axum::body::Bytes,
) -> PageResult {
    let pairs = form_pairs(&body);
    let get = |k: &str| form_value(&pairs, k);
    let role = get("role")
        .as_deref()
        .and_then(Role::parse)
        .filter(|r| *r != Role::Platform)
        .ok_or_else(|| {
            PageError(ApiError::bad_request(
                "choose a role: viewer, analyst, operator or admin",
            ))
        })?;
    let made = make_key(
        &s,
        &user.caller,
        NewKeyBody {
            role,
            tenant: None,
            name: get("name"),
        },
    )
    .await?;
    let keys = s.warehouse.keys(Some(&user.tenant)).await?;
    Ok(keys_page(
        &user,
        &keys,
        Some((&made.secret, role.as_str())),
        None,
    ))
}

/// `POST /keys/{id}/revoke`
pub async fn revoke_key<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
) -> PageResult {
    if id == user.caller.key_id {
        return Err(PageError(ApiError::bad_request(
            "this session's own key cannot be revoked here: sign in with another admin key",
        )));
    }
    revoke(&s, &user.caller, &id).await?;
    Ok(Redirect::to("/keys?notice=revoked").into_response())
}
