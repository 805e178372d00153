//! The overview: every pipeline with its source, health, last run, last success, next
//! scheduled run and open quarantine; `Sync now` for operators.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use maud::html;
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::Store;
use sluice_workers::TriggerOutcome;

use crate::console::session::SignedIn;
use crate::console::{PageResult, badge, csrf_field, layout, may, url_encode};
use crate::request_id::RequestId;
use crate::routes::{pipeline_statuses, queue_sync};
use crate::state::AppState;

/// A notice to show.
#[derive(Debug, Deserialize)]
pub struct Notice {
    /// Its code (see [`crate::console::notice_text`]).
    pub notice: Option<String>,
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

/// `GET /`
pub async fn page<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Query(n): Query<Notice>,
) -> PageResult {
    let statuses = pipeline_statuses(&s, &user.tenant).await?;
    let pipelines = s.warehouse.pipelines(&user.tenant).await?;
    let open = if user.caller.role >= sluice_engine::control::Role::Analyst {
        Some(
            s.warehouse
                .quarantine_stats(&user.tenant)
                .await?
                .open_by_pipeline,
        )
    } else {
        None
    };
    let can_sync = may(&user, "post", "/pipelines/{name}/sync");
    let body = html! {
        h1 { "Pipelines" }
        @if statuses.is_empty() {
            p class="empty" { "No pipelines yet. An admin registers one with " code { "POST /v1/pipelines" } " or " code { "sluice pipelines register" } "." }
        } @else {
            div class="table-wrap" {
            table class="data" {
                caption class="sr-only" { "Pipelines of " (user.tenant.as_str()) }
                thead { tr {
                    th scope="col" { "Pipeline" } th scope="col" { "Source" } th scope="col" { "Entity" }
                    th scope="col" { "Health" } th scope="col" { "Last run" }
                    th scope="col" class="num" { "Loaded" } th scope="col" class="num" { "Quarantined" }
                    th scope="col" { "Last success" } th scope="col" { "Next run" }
                    @if open.is_some() { th scope="col" class="num" { "Open quarantine" } }
                    @if can_sync { th scope="col" { span class="sr-only" { "Actions" } } }
                } }
                tbody {
                    @for st in &statuses {
                        @let name = text(&st["pipeline"]);
                        @let spec = pipelines.iter().find(|p| p.name == name).map(|p| &p.spec);
                        @let last = &st["last_run"];
                        tr {
                            th scope="row" { (name) }
                            td { (spec.map(|s| text(&s["source"]["kind"])).unwrap_or_default()) }
                            td { (spec.map(|s| text(&s["entity"])).unwrap_or_default()) }
                            td {
                                @if st["health"]["ok"] == Value::Bool(true) {
                                    span class="badge ok" title=(text(&st["health"]["detail"])) { "ok" }
                                    " " span class="muted small" { (text(&st["health"]["latency_ms"])) " ms" }
                                } @else {
                                    span class="badge failed" { "unreachable" }
                                    div class="small error-text" { (text(&st["health"]["error"])) }
                                }
                            }
                            td {
                                @if last.is_null() { span class="muted" { "never" } }
                                @else {
                                    a href={ "/runs/" (text(&last["run_id"])) } { (badge(&text(&last["status"]))) }
                                    " " span class="small muted" { (text(&last["started_at"]).get(..19).unwrap_or("").replace('T', " ")) }
                                }
                            }
                            td class="num" { (text(&last["loaded"])) }
                            td class="num" { (text(&last["quarantined"])) }
                            td class="small" { (text(&st["last_success"]["finished_at"]).get(..19).unwrap_or("—").replace('T', " ")) }
                            td class="small" { (text(&st["next_run"]).get(..19).unwrap_or("—").replace('T', " ")) }
                            @if let Some(open) = &open {
                                td class="num" {
                                    @let n = open.get(&name).copied().unwrap_or(0);
                                    @if n > 0 { a href={ "/quarantine?pipeline=" (url_encode(&name)) } { (n) } } @else { "0" }
                                }
                            }
                            @if can_sync {
                                td {
                                    form method="post" action={ "/pipelines/" (url_encode(&name)) "/sync" } {
                                        (csrf_field(&user))
                                        button type="submit" aria-label={ "Sync " (name) " now" } { "Sync now" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            }
        }
    };
    Ok(layout(&user, "Overview", "/", n.notice.as_deref(), body))
}

/// `POST /pipelines/{name}/sync`: queues a sync and shows its run.
pub async fn sync_now<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Path(name): Path<String>,
) -> PageResult {
    let triggered = queue_sync(&s, &user.caller, &name, None, request_id).await?;
    let notice = if triggered.outcome == TriggerOutcome::Enqueued {
        "synced"
    } else {
        "joined"
    };
    Ok(Redirect::to(&format!(
        "/runs/{}?notice={notice}",
        url_encode(&triggered.run_id)
    ))
    .into_response())
}
