//! Dead letters: jobs that ran out of attempts, each attempt with its error, and `Replay`
//! (admin) which queues the job again, once.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use maud::html;
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::Store;

use crate::console::session::SignedIn;
use crate::console::{PageResult, csrf_field, layout, may, short_id, url_encode, when, when_text};
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::routes::replay_dead;
use crate::state::AppState;

/// `GET /dead-letters`
pub async fn list<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
) -> PageResult {
    let letters = s.warehouse.dead_letters(&user.tenant, 500).await?;
    let body = html! {
        h1 { "Dead letters" }
        p class="muted" { "Jobs that failed every attempt. Nothing of theirs was loaded twice; replaying one queues it again, once." }
        @if letters.is_empty() { p class="empty" { "No dead letters." } }
        @else {
            div class="table-wrap" {
            table class="data" {
                thead { tr {
                    th scope="col" { "Dead letter" } th scope="col" { "Pipeline" } th scope="col" { "Job" }
                    th scope="col" class="num" { "Attempts" } th scope="col" { "Why" } th scope="col" { "Died" }
                    th scope="col" { "Replayed" }
                } }
                tbody {
                    @for d in &letters {
                        tr {
                            td { a class="mono" href={ "/dead-letters/" (url_encode(&d.id)) } { (short_id(&d.id)) } }
                            td { (d.pipeline) }
                            td { (d.job_kind) }
                            td class="num" { (d.attempts.as_array().map_or(0, Vec::len)) }
                            td class="small error-text" { (d.reason) }
                            td class="small" { (when(&d.created_at)) }
                            td class="small" {
                                @if let Some(run) = &d.replay_run { a class="mono" href={ "/runs/" (url_encode(run)) } { "run" } }
                                @else { "—" }
                            }
                        }
                    }
                }
            }
            }
        }
    };
    Ok(layout(&user, "Dead letters", "/dead-letters", None, body))
}

/// Query of a dead letter's page.
#[derive(Debug, Deserialize)]
pub struct LetterQuery {
    notice: Option<String>,
}

/// `GET /dead-letters/{id}`
pub async fn show<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(q): Query<LetterQuery>,
) -> PageResult {
    let d = s
        .warehouse
        .dead_letter(&user.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("dead letter {id}")))?;
    let attempts = d.attempts.as_array().cloned().unwrap_or_default();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    };
    let body = html! {
        p { a href="/dead-letters" { "← Dead letters" } }
        h1 { "Dead letter" }
        dl class="facts" {
            dt { "Pipeline" } dd { (d.pipeline) }
            dt { "Job" } dd { (d.job_kind) }
            dt { "Why" } dd class="error-text" { (d.reason) }
            dt { "Died" } dd { (when(&d.created_at)) }
            dt { "Replayed" } dd {
                @match (&d.replayed_at, &d.replay_run) {
                    (Some(at), Some(run)) => { (when(at)) " as " a class="mono" href={ "/runs/" (url_encode(run)) } { (run) } }
                    _ => { "not yet" }
                }
            }
        }
        h2 { "Attempts" }
        table class="data" {
            thead { tr { th scope="col" { "#" } th scope="col" { "When" } th scope="col" { "Transient" } th scope="col" { "Error" } } }
            tbody {
                @for a in &attempts {
                    tr {
                        td { (text(&a["number"])) }
                        td class="small" { (when_text(&text(&a["at"]))) }
                        td { (text(&a["transient"])) }
                        td class="error-text" { (text(&a["error"])) }
                    }
                }
            }
        }
        @if d.replayed_at.is_none() && may(&user, "post", "/dead-letters/{id}/replay") {
            form method="post" action={ "/dead-letters/" (url_encode(&id)) "/replay" } {
                (csrf_field(&user))
                button type="submit" class="primary" { "Replay" }
            }
        }
    };
    Ok(layout(
        &user,
        "Dead letter",
        "/dead-letters",
        q.notice.as_deref(),
        body,
    ))
}

/// `POST /dead-letters/{id}/replay`
pub async fn replay<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Path(id): Path<String>,
) -> PageResult {
    let run_id = replay_dead(&s, &user.caller, &id, request_id).await?;
    Ok(Redirect::to(&format!("/runs/{}?notice=replayed", url_encode(&run_id))).into_response())
}
