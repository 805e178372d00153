//! Quarantine: the rows set aside, filtered and paged; a row's page with its raw values in
//! source column order (each an input labelled with its column), the errors beside the
//! column they concern, where it came from, and `Save` / `Retry` / `Ignore`; several rows,
//! or every row matching a filter, retried as one replay run.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::Store;
use sluice_engine::quarantine::QuarantinedRow;

use crate::console::session::SignedIn;
use crate::console::{
    PageError, PageResult, badge, csrf_field, form_pairs, form_value, layout, may, pipeline_names,
    query_string, short_id, url_encode, when,
};
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::routes::{QuarantineQuery, RetryBody, fix_row, ignore_row, quarantine_page, retry_rows};
use crate::state::AppState;

/// Filters of the list.
#[derive(Debug, Default, Deserialize)]
pub struct RowFilter {
    pipeline: Option<String>,
    run_id: Option<String>,
    rule: Option<String>,
    field: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
    notice: Option<String>,
}

fn some(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| !s.trim().is_empty())
}

impl RowFilter {
    fn query(&self, limit: u32, cursor: Option<String>) -> QuarantineQuery {
        QuarantineQuery {
            pipeline: some(&self.pipeline),
            run_id: some(&self.run_id),
            rule: some(&self.rule),
            field: some(&self.field),
            status: some(&self.status),
            limit: Some(limit),
            cursor,
            ..QuarantineQuery::default()
        }
    }

    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("pipeline", some(&self.pipeline)),
            ("run_id", some(&self.run_id)),
            ("rule", some(&self.rule)),
            ("field", some(&self.field)),
            ("status", some(&self.status)),
        ]
    }
}

/// A raw value as the form shows it (an empty cell: empty).
fn shown(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `GET /quarantine`
pub async fn list<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Query(f): Query<RowFilter>,
) -> PageResult {
    let (rows, next) = quarantine_page(&s, &user.tenant, f.query(50, some(&f.cursor))).await?;
    let names = pipeline_names(&s, &user.tenant).await?;
    let stats = s.warehouse.quarantine_stats(&user.tenant).await?;
    let can_retry = may(&user, "post", "/quarantine/retry");
    let pairs = f.pairs();
    let filter_query: Vec<(&str, Option<&str>)> =
        pairs.iter().map(|(k, v)| (*k, v.as_deref())).collect();
    let body = html! {
        h1 { "Quarantine" }
        p class="muted" {
            @for (status, n) in &stats.by_status { (badge(status)) " " (n) "  " }
        }
        form method="get" action="/quarantine" class="filters" {
            label { "Pipeline "
                select name="pipeline" {
                    option value="" { "all" }
                    @for n in &names { option value=(n) selected[some(&f.pipeline).as_deref() == Some(n.as_str())] { (n) } }
                }
            }
            label { "Run " input name="run_id" value=(some(&f.run_id).unwrap_or_default()) size="20"; }
            label { "Rule "
                select name="rule" {
                    option value="" { "any" }
                    @for r in stats.by_rule.keys() { option value=(r) selected[some(&f.rule).as_deref() == Some(r.as_str())] { (r) } }
                }
            }
            label { "Field "
                select name="field" {
                    option value="" { "any" }
                    @for r in stats.by_field.keys() { option value=(r) selected[some(&f.field).as_deref() == Some(r.as_str())] { (r) } }
                }
            }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for st in ["pending", "fixed", "replayed", "ignored"] {
                        option value=(st) selected[some(&f.status).as_deref() == Some(st)] { (st) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        @if rows.is_empty() { p class="empty" { "No quarantined rows match." } }
        @else {
            form method="post" action="/quarantine/retry" id="retry-selected" {
                (csrf_field(&user))
                @for (k, v) in &pairs { @if let Some(v) = v { input type="hidden" name={ "filter." (k) } value=(v); } }
                div class="table-wrap" {
                table class="data" {
                    thead { tr {
                        @if can_retry { th scope="col" { input type="checkbox" data-select-all="ids" aria-label="Select every row on this page"; } }
                        th scope="col" { "Row" } th scope="col" { "Status" } th scope="col" { "Pipeline" }
                        th scope="col" { "Source position" } th scope="col" { "Errors" } th scope="col" { "Quarantined" }
                    } }
                    tbody {
                        @for r in &rows {
                            tr {
                                @if can_retry { td { input type="checkbox" name="ids" value=(r.id) aria-label={ "Select row " (r.id) }; } }
                                td { a class="mono" href={ "/quarantine/" (url_encode(&r.id)) } { (short_id(&r.id)) } }
                                td { (badge(r.status.as_str())) }
                                td { (r.pipeline) }
                                td class="small" { (position(r)) }
                                td class="small" {
                                    @for e in &r.errors { div { span class="rule" { (e.rule) } " · " (e.field) } }
                                }
                                td class="small" { (when(&r.created_at)) }
                            }
                        }
                    }
                }
                }
                @if can_retry {
                    div class="actions" {
                        button type="submit" name="scope" value="selected" { "Retry selected" }
                        button type="submit" name="scope" value="matching" { "Retry everything matching the filter" }
                    }
                }
            }
        }
        @if let Some(c) = next {
            @let q: Vec<(&str, Option<&str>)> = filter_query.iter().copied().chain([("cursor", Some(c.as_str()))]).collect();
            p { a rel="next" href={ "/quarantine" (query_string(&q)) } { "Next page →" } }
        }
    };
    Ok(layout(
        &user,
        "Quarantine",
        "/quarantine",
        f.notice.as_deref(),
        body,
    ))
}

fn position(r: &QuarantinedRow) -> Markup {
    let p = &r.position;
    html! {
        span class="mono" { (p.location) }
        @if let Some(sheet) = &p.sheet { ", sheet " (sheet) }
        ", line " (p.row)
    }
}

/// How many rows "everything matching" may select when the filter needs ids.
const MATCHING_CAP: usize = 10_000;

/// `POST /quarantine/retry`: the selected rows, or every open row matching the filter, as
/// one replay run.
pub async fn retry_many<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: axum::body::Bytes,
) -> PageResult {
    let pairs = form_pairs(&body);
    let get = |k: &str| form_value(&pairs, k);
    let retry = if get("scope").as_deref() == Some("matching") {
        let f = RowFilter {
            pipeline: get("filter.pipeline"),
            run_id: get("filter.run_id"),
            rule: get("filter.rule"),
            field: get("filter.field"),
            status: get("filter.status"),
            ..RowFilter::default()
        };
        if f.pipeline.is_none() {
            return Err(PageError(ApiError::bad_request(
                "choose a pipeline in the filter first: a replay run replays one pipeline's rows",
            )));
        }
        if f.field.is_none() && f.status.is_none() {
            // The filter the replay itself understands: every open row of the pipeline
            // (of the run, failing the rule).
            RetryBody {
                pipeline: f.pipeline,
                run_id: f.run_id,
                rule: f.rule,
                ..RetryBody::default()
            }
        } else {
            let mut ids = Vec::new();
            let mut cursor = None;
            loop {
                let (rows, next) = quarantine_page(&s, &user.tenant, f.query(1000, cursor)).await?;
                ids.extend(
                    rows.into_iter()
                        .filter(|r| r.status.as_str() == "pending" || r.status.as_str() == "fixed")
                        .map(|r| r.id),
                );
                if ids.len() > MATCHING_CAP {
                    return Err(PageError(ApiError::bad_request(format!(
                        "more than {MATCHING_CAP} rows match: narrow the filter by run or rule"
                    ))));
                }
                match next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            if ids.is_empty() {
                return Err(PageError(ApiError::bad_request(
                    "no open (pending or fixed) row matches the filter",
                )));
            }
            RetryBody {
                ids,
                ..RetryBody::default()
            }
        }
    } else {
        let ids: Vec<String> = pairs
            .iter()
            .filter(|(k, _)| k == "ids")
            .map(|(_, v)| v.clone())
            .collect();
        if ids.is_empty() {
            return Err(PageError(ApiError::bad_request("select at least one row")));
        }
        RetryBody {
            ids,
            ..RetryBody::default()
        }
    };
    let run_id = retry_rows(&s, &user.caller, retry, request_id).await?;
    Ok(Redirect::to(&format!("/runs/{}?notice=retried", url_encode(&run_id))).into_response())
}

/// Query of a row's page.
#[derive(Debug, Deserialize)]
pub struct RowPageQuery {
    notice: Option<String>,
}

/// `GET /quarantine/{id}`
pub async fn show<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(q): Query<RowPageQuery>,
) -> PageResult {
    let row = s
        .warehouse
        .quarantined_row(&user.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("quarantined row {id}")))?;
    // Errors name canonical fields; the pipeline's mapping says which column each came from.
    let mapping: std::collections::BTreeMap<String, String> = s
        .warehouse
        .pipeline(&user.tenant, &row.pipeline)
        .await?
        .and_then(|p| serde_json::from_value(p.spec["mapping"].clone()).ok())
        .unwrap_or_default();
    // As the mapping stage matches: the mapped column, else the field's own name in any case.
    let column_of = |field: &str| -> Option<String> {
        let wanted = mapping.get(field).map_or(field, String::as_str);
        row.raw
            .keys()
            .find(|c| c.as_str() == wanted)
            .or_else(|| row.raw.keys().find(|c| c.eq_ignore_ascii_case(wanted)))
            .cloned()
    };
    let unplaced: Vec<_> = row
        .errors
        .iter()
        .filter(|e| column_of(&e.field).is_none())
        .collect();
    let open = matches!(row.status.as_str(), "pending" | "fixed");
    let can_fix = may(&user, "post", "/quarantine/{id}/save") && open;
    let body = html! {
        p { a href={ "/quarantine?pipeline=" (url_encode(&row.pipeline)) } { "← Quarantine of " (row.pipeline) } }
        h1 { "Quarantined row" }
        dl class="facts" {
            dt { "Status" } dd { (badge(row.status.as_str())) }
            dt { "Pipeline" } dd { (row.pipeline) }
            dt { "Entity" } dd { (row.entity) }
            dt { "File or source" } dd class="mono" { (row.position.location) }
            @if let Some(sheet) = &row.position.sheet { dt { "Sheet" } dd { (sheet) } }
            dt { "Line" } dd { (row.position.row) }
            dt { "Run" } dd { a class="mono" href={ "/runs/" (url_encode(&row.run_id)) } { (row.run_id) } }
            dt { "Quarantined" } dd { (when(&row.created_at)) }
            dt { "Id" } dd class="mono small" { (row.id) }
        }
        @if !unplaced.is_empty() {
            div class="problem" role="alert" {
                @for e in &unplaced { p { strong { (e.field) } " (" (e.rule) "): " (e.message) } }
            }
        }
        form method="post" action={ "/quarantine/" (url_encode(&id)) "/save" } class="row-form" {
            (csrf_field(&user))
            @for (i, (column, value)) in row.raw.iter().enumerate() {
                @let errors: Vec<_> = row.errors.iter().filter(|e| column_of(&e.field).as_deref() == Some(column.as_str())).collect();
                div class={ "field" @if !errors.is_empty() { " invalid" } } {
                    label for={ "c" (i) } { (column) }
                    input id={ "c" (i) } name={ "raw." (column) } value=(shown(value))
                        readonly[!can_fix] aria-invalid=[(!errors.is_empty()).then_some("true")]
                        aria-describedby=[(!errors.is_empty()).then(|| format!("e{i}"))];
                    @if !errors.is_empty() {
                        div class="field-errors" id={ "e" (i) } {
                            @for e in &errors { div { span class="rule" { (e.rule) } ": " (e.message) } }
                        }
                    }
                }
            }
            @if can_fix { div class="actions" { button type="submit" class="primary" { "Save" } } }
        }
        @if can_fix {
            div class="actions spaced" {
                form method="post" action={ "/quarantine/" (url_encode(&id)) "/retry" } {
                    (csrf_field(&user))
                    button type="submit" { "Retry" }
                }
                form method="post" action={ "/quarantine/" (url_encode(&id)) "/ignore" } class="inline" {
                    (csrf_field(&user))
                    label for="reason" { "Reason" }
                    input id="reason" name="reason" required placeholder="why this row is set aside";
                    button type="submit" class="danger" { "Ignore" }
                }
            }
        } @else if !open {
            p class="muted" { "This row is " (row.status.as_str()) ": it can no longer be changed." }
        }
    };
    Ok(layout(
        &user,
        "Quarantined row",
        "/quarantine",
        q.notice.as_deref(),
        body,
    ))
}

/// `POST /quarantine/{id}/save`: the values that changed, as the PATCH would send them.
pub async fn save<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> PageResult {
    let row = s
        .warehouse
        .quarantined_row(&user.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("quarantined row {id}")))?;
    let mut changes = serde_json::Map::new();
    for (k, v) in form_pairs(&body) {
        let Some(column) = k.strip_prefix("raw.") else {
            continue;
        };
        let Some(before) = row.raw.get(column) else {
            return Err(PageError(ApiError::bad_request(format!(
                "the row has no column {column:?}"
            ))));
        };
        if shown(before) != v {
            let value = if v.is_empty() {
                Value::Null
            } else {
                Value::String(v)
            };
            changes.insert(column.to_string(), value);
        }
    }
    if !changes.is_empty() {
        fix_row(&s, &user.caller, &id, changes).await?;
    }
    Ok(Redirect::to(&format!("/quarantine/{}?notice=saved", url_encode(&id))).into_response())
}

/// `POST /quarantine/{id}/retry`: the row as a replay run of its own.
pub async fn retry<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Path(id): Path<String>,
) -> PageResult {
    let run_id = retry_rows(
        &s,
        &user.caller,
        RetryBody {
            ids: vec![id],
            ..RetryBody::default()
        },
        request_id,
    )
    .await?;
    Ok(Redirect::to(&format!("/runs/{}?notice=retried", url_encode(&run_id))).into_response())
}

/// `POST /quarantine/{id}/ignore`
pub async fn ignore<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> PageResult {
    let reason = form_value(&form_pairs(&body), "reason").unwrap_or_default();
    ignore_row(&s, &user.caller, &id, &reason).await?;
    Ok(Redirect::to(&format!("/quarantine/{}?notice=ignored", url_encode(&id))).into_response())
}
