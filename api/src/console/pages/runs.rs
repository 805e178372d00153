//! Runs: a filtered list, and a run's page with its accounting (the field names of
//! `sync --json`), its quarantine per rule, its attempts with their errors, and live
//! counts while it runs (the script polls `GET /v1/runs/{id}` with the session).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use maud::html;
use serde::Deserialize;
use sluice_engine::{RunLedger, RunStatus, Store};

use crate::console::session::SignedIn;
use crate::console::{
    PageResult, badge, layout, pipeline_names, query_string, url_encode, when, when_text,
};
use crate::routes::{RunsQuery, run_json, runs_page};
use crate::state::AppState;

/// Filters of the runs list.
#[derive(Debug, Default, Deserialize)]
pub struct RunFilter {
    pipeline: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
}

/// `GET /runs`
pub async fn list<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Query(f): Query<RunFilter>,
) -> PageResult {
    let pipeline = f.pipeline.clone().filter(|p| !p.is_empty());
    let status = f.status.clone().filter(|p| !p.is_empty());
    let q = RunsQuery {
        pipeline: pipeline.clone(),
        status: status.clone(),
        cursor: f.cursor.clone().filter(|c| !c.is_empty()),
        limit: Some(50),
        ..RunsQuery::default()
    };
    let (runs, next) = runs_page(&s, &user.tenant, &q).await?;
    let names = pipeline_names(&s, &user.tenant).await?;
    let body = html! {
        h1 { "Runs" }
        form method="get" action="/runs" class="filters" {
            label { "Pipeline "
                select name="pipeline" {
                    option value="" { "all" }
                    @for n in &names { option value=(n) selected[pipeline.as_deref() == Some(n.as_str())] { (n) } }
                }
            }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for st in ["running", "succeeded", "failed"] {
                        option value=(st) selected[status.as_deref() == Some(st)] { (st) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        (runs_table(&runs))
        @if let Some(c) = next {
            p { a rel="next" href={ "/runs" (query_string(&[("pipeline", pipeline.as_deref()), ("status", status.as_deref()), ("cursor", Some(&c))])) } { "Older runs →" } }
        }
    };
    Ok(layout(&user, "Runs", "/runs", None, body))
}

/// A table of runs.
pub fn runs_table(runs: &[RunLedger]) -> maud::Markup {
    html! {
        @if runs.is_empty() { p class="empty" { "No runs match." } }
        @else {
            div class="table-wrap" {
            table class="data" {
                thead { tr {
                    th scope="col" { "Run" } th scope="col" { "Pipeline" } th scope="col" { "Trigger" }
                    th scope="col" { "Status" } th scope="col" { "Started" }
                    th scope="col" class="num" { "Read" } th scope="col" class="num" { "Loaded" }
                    th scope="col" class="num" { "Quarantined" } th scope="col" class="num" { "Deduplicated" }
                } }
                tbody {
                    @for r in runs {
                        tr {
                            td { a class="mono" href={ "/runs/" (url_encode(&r.run_id)) } { (r.run_id) } }
                            td { (r.pipeline) }
                            td { (r.trigger.as_str()) }
                            td { (badge(r.status.as_str())) }
                            td class="small" { (when(&r.started_at)) }
                            td class="num" { (r.counts.rows_read) }
                            td class="num" { (r.counts.loaded()) }
                            td class="num" { (r.counts.quarantined) }
                            td class="num" { (r.counts.deduplicated) }
                        }
                    }
                }
            }
            }
        }
    }
}

/// A queued job's run has no ledger until a worker starts it; the API answers it as
/// `queued` while the queue remembers it. Past that (or where it could not be
/// remembered), its id (a UUIDv7) says when it was queued: an id queued within the last
/// day is shown as waiting, not as missing.
fn recently_queued(id: &str) -> bool {
    let job = id.split('.').next().unwrap_or(id);
    uuid::Uuid::parse_str(job)
        .ok()
        .and_then(|u| u.get_timestamp())
        .map(|t| t.to_unix().0)
        .is_some_and(|secs| {
            let now = chrono::Utc::now().timestamp();
            (now - 86_400..=now + 60).contains(&(secs as i64))
        })
}

fn queued_page(user: &SignedIn, id: &str, notice: Option<&str>) -> axum::response::Response {
    let body = html! {
        h1 { "Run " span class="mono" { (id) } }
        div class="run" data-live-run=(id) data-waiting {
            p { (badge("queued")) " Waiting for a worker to start it. This page follows it." }
        }
    };
    layout(user, "Run", "/runs", notice, body)
}

/// Query of a run's page.
#[derive(Debug, Deserialize)]
pub struct RunPageQuery {
    notice: Option<String>,
}

/// The accounting fields, in the order `sync --json` prints them.
const ACCOUNTING: &[&str] = &[
    "rows_read",
    "loaded",
    "inserted",
    "updated",
    "unchanged",
    "quarantined",
    "deduplicated",
];

/// `GET /runs/{id}`
pub async fn show<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(q): Query<RunPageQuery>,
) -> PageResult {
    let run = match run_json(&s, &user.tenant, &id).await {
        Ok(run) if run.status == RunStatus::Queued => {
            return Ok(queued_page(&user, &id, q.notice.as_deref()));
        }
        Ok(run) => serde_json::json!(run),
        Err(e) if e.status == axum::http::StatusCode::NOT_FOUND && recently_queued(&id) => {
            return Ok(queued_page(&user, &id, q.notice.as_deref()));
        }
        Err(e) => return Err(e.into()),
    };
    let pipeline = run["pipeline"].as_str().unwrap_or_default().to_string();
    // A job's page lists its attempts; an attempt's page links to its job.
    let attempts: Vec<serde_json::Value> = run["attempts"].as_array().cloned().unwrap_or_default();
    let job_id = run["job_id"].as_str().map(str::to_string);
    let status = run["status"].as_str().unwrap_or_default().to_string();
    let running = status == RunStatus::Running.as_str();
    let by_rule = run["quarantined_by_rule"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let field = |k: &str| match &run[k] {
        serde_json::Value::Null => "—".to_string(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let body = html! {
        h1 { "Run " span class="mono" { (id) } }
        div class="run" data-live-run=[running.then_some(id.as_str())] {
            dl class="facts" {
                dt { "Pipeline" } dd { a href={ "/runs?pipeline=" (url_encode(&pipeline)) } { (pipeline) } }
                dt { "Entity" } dd { (field("entity")) }
                dt { "Trigger" } dd { (field("trigger")) }
                dt { "Status" } dd data-field="status" { (badge(&status)) }
                dt { "Started" } dd { (when_text(&field("started_at"))) }
                dt { "Finished" } dd { (when_text(&field("finished_at"))) }
            }
            h2 { "Accounting" }
            p class="muted small" { "rows_read = loaded + quarantined + deduplicated; loaded = inserted + updated + unchanged." }
            table class="data accounting" {
                thead { tr { @for k in ACCOUNTING { th scope="col" class="num" { (k) } } } }
                tbody { tr { @for k in ACCOUNTING { td class="num" data-field=(k) { (field(k)) } } } }
            }
            @if running { p class="muted small" role="status" data-live-note { "Running: the counts update as batches commit." } }
            @if let Some(e) = run["error"].as_str() {
                h2 { "Error" }
                pre class="error-text" { (e) }
            }
            h2 { "Quarantined by rule" }
            @if by_rule.is_empty() { p class="empty" { "Nothing quarantined." } }
            @else {
                table class="data narrow-table" {
                    thead { tr { th scope="col" { "Rule" } th scope="col" class="num" { "Rows" } } }
                    tbody {
                        @for (rule, n) in &by_rule {
                            tr {
                                td { a href={ "/quarantine?run_id=" (url_encode(&id)) "&rule=" (url_encode(rule)) } { (rule) } }
                                td class="num" { (n) }
                            }
                        }
                    }
                }
            }
            @if let Some(job) = &job_id {
                p { "One attempt of job " a class="mono" href={ "/runs/" (url_encode(job)) } { (job) } ", which reports the whole." }
            } @else {
                h2 { "Attempts" }
                p class="muted small" { "The job's counts above are these attempts' sums: an attempt that takes over resumes after the batches its predecessor committed." }
                table class="data" {
                    thead { tr {
                        th scope="col" { "#" } th scope="col" { "Run" } th scope="col" { "Status" }
                        th scope="col" { "Started" } th scope="col" class="num" { "Read" }
                        th scope="col" class="num" { "Loaded" } th scope="col" class="num" { "Quarantined" } th scope="col" { "Error" }
                    } }
                    tbody {
                        @for a in &attempts {
                            @let id = a["run_id"].as_str().unwrap_or_default();
                            tr {
                                td { (a["attempt"]) }
                                td { a class="mono" href={ "/runs/" (url_encode(id)) } { (id) } }
                                td { (badge(a["status"].as_str().unwrap_or_default())) }
                                td class="small" { (when_text(a["started_at"].as_str().unwrap_or_default())) }
                                td class="num" { (a["rows_read"]) }
                                td class="num" { (a["loaded"]) }
                                td class="num" { (a["quarantined"]) }
                                td class="small error-text" { (a["error"].as_str().unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&user, "Run", "/runs", q.notice.as_deref(), body))
}
