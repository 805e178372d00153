//! The `/v1` routes so far: pipelines, syncs, runs, dead letters, keys and the audit log.
//! Every resource is looked up inside the caller's tenant, so another tenant's id is 404.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_connectors::Source;
use sluice_engine::RunTrigger;
use sluice_engine::TenantSlug;
use sluice_engine::control::{NewApiKey, PipelineChange, PipelineOrigin, Role, StoredPipeline};
use sluice_engine::quarantine::{QuarantineFilter, QuarantineStatus, QuarantinedRow};
use sluice_engine::{RunLedger, RunStatus, RunView};

use crate::openapi::Pipeline;
use sluice_pipelines::{PipelineSource, PipelineSpec, carry_secrets};
use sluice_workers::jobs::ReplaySelection;
use sluice_workers::{IdempotencyKey, TriggerOutcome, TriggerRequest};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::export;
use crate::request_id::RequestId;
use crate::state::AppState;
use sluice_engine::Store;

pub(crate) type Api<W> = State<Arc<AppState<W>>>;
pub(crate) type Reply = Result<Response, ApiError>;

pub(crate) fn ok(v: impl serde::Serialize) -> Reply {
    Ok(Json(v).into_response())
}

/// The export format the request's `Accept` header asks for.
fn accepted(headers: &HeaderMap) -> export::Format {
    export::Format::from_accept(
        headers
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    )
}

/// A report in the format the `Accept` header asks for: its JSON, or its table as CSV
/// (`text/csv`) or as an XLSX workbook, each an attachment named `name`.
fn negotiated(
    headers: &HeaderMap,
    json: impl FnOnce() -> Value,
    table: impl FnOnce() -> export::Table,
    name: &str,
) -> Reply {
    let (media, body) = match accepted(headers) {
        export::Format::Json => return ok(json()),
        export::Format::Csv => ("text/csv; charset=utf-8", export::to_csv(&table())),
        export::Format::Xlsx => (
            export::XLSX,
            export::to_xlsx(&table()).map_err(ApiError::internal)?,
        ),
    };
    let extension = if media == export::XLSX { "xlsx" } else { "csv" };
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, media.to_string()),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.{extension}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// The most quarantined rows one export holds; past it, the caller narrows the filter.
const EXPORT_ROWS: usize = 100_000;

pub(crate) async fn audit<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    action: &str,
    target: &str,
    detail: Value,
) -> Result<(), ApiError> {
    s.warehouse
        .record_audit(
            &caller.key_id,
            action,
            caller.tenant.as_ref(),
            target,
            &detail,
        )
        .await?;
    Ok(())
}

/// A stored pipeline as the API shows it: its fields without secrets, and which secrets it
/// has.
fn pipeline_json(p: &StoredPipeline) -> Pipeline {
    Pipeline {
        name: p.name.clone(),
        pipeline: p.spec.clone(),
        secrets: p.secrets.keys().cloned().collect(),
        updated_at: p.updated_at,
    }
}

/// Parses a pipeline body: the pipeline file's fields as JSON; `tenant` defaults to the
/// caller's and may not name another.
fn parse_pipeline(mut body: Value, tenant: &TenantSlug) -> Result<PipelineSpec, ApiError> {
    let obj = body
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    match obj.get("tenant") {
        None => {
            obj.insert("tenant".into(), Value::String(tenant.to_string()));
        }
        Some(Value::String(t)) if t == tenant.as_str() => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "`tenant` must be the API key's tenant (or left out)",
            ));
        }
    }
    let spec: PipelineSpec = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("not a valid pipeline: {e}")))?;
    spec.check()?;
    Ok(spec)
}

/// `limit` and `cursor` of a list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Page size (1-1000).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub(crate) limit: Option<u32>,
    /// The last id of the previous page (its `next_cursor`).
    pub(crate) cursor: Option<String>,
}

/// One page of `items` (in list order) after the item whose key is `cursor`.
fn page_of<'a, T>(
    items: &'a [T],
    key: impl Fn(&T) -> &str,
    page: &Page,
    default: u32,
) -> (Vec<&'a T>, Option<String>) {
    let limit = page.limit.unwrap_or(default).clamp(1, 1000) as usize;
    let start = page.cursor.as_deref().map_or(0, |c| {
        items
            .iter()
            .position(|i| key(i) == c)
            .map_or(items.len(), |p| p + 1)
    });
    let rest = &items[start.min(items.len())..];
    let chosen: Vec<&T> = rest.iter().take(limit).collect();
    let next = (rest.len() > limit)
        .then(|| chosen.last().map(|i| key(i).to_string()))
        .flatten();
    (chosen, next)
}

/// `GET /v1/pipelines`: by name, paged by cursor.
#[utoipa::path(
    get,
    path = "/v1/pipelines",
    tag = "pipelines",
    summary = "List pipelines",
    security(("bearer" = ["viewer"])),
    params(Page),
    responses((status = 200, description = "A page of pipelines", body = crate::openapi::PipelinePage))
)]
pub async fn list_pipelines<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Viewer)?;
    let all = s.warehouse.pipelines(tenant).await?;
    let (items, next) = page_of(&all, |p| p.name.as_str(), &page, 100);
    ok(json!({
        "items": items.into_iter().map(pipeline_json).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

/// `POST /v1/pipelines`
#[utoipa::path(
    post,
    path = "/v1/pipelines",
    tag = "pipelines",
    summary = "Create a pipeline (the pipeline file's fields as JSON; secrets write-only)",
    security(("bearer" = ["admin"])),
    request_body(content = sluice_pipelines::PipelineSpec, description = "The pipeline file's fields as JSON; `tenant` may be left out (it is the key's)", example = json!({"name": "invoices", "tenant": "acme", "entity": "invoices", "source": {"kind": "csv", "path": "invoices.csv"}})),
    responses((status = 201, description = "Created", body = crate::openapi::Pipeline))
)]
pub async fn create_pipeline<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Admin)?;
    let mut spec = parse_pipeline(body, tenant)?;
    s.confinement.check_spec(&mut spec)?;
    if s.warehouse.pipeline(tenant, &spec.name).await?.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "pipeline '{}' exists; PUT /v1/pipelines/{} replaces it",
                spec.name, spec.name
            ),
        ));
    }
    let (fields, secrets) = spec.to_stored();
    let change = PipelineChange {
        actor: caller.key_id.clone(),
        action: "pipeline.create",
        origin: PipelineOrigin::Api,
        detail: json!({ "after": fields, "secrets": secrets.keys().collect::<Vec<_>>() }),
    };
    s.warehouse
        .save_pipeline(tenant, &spec.name, &fields, &secrets, &change)
        .await?;
    let stored = s
        .warehouse
        .pipeline(tenant, &spec.name)
        .await?
        .ok_or_else(|| ApiError::internal("pipeline vanished after saving"))?;
    Ok((StatusCode::CREATED, Json(pipeline_json(&stored))).into_response())
}

async fn stored<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
    name: &str,
) -> Result<StoredPipeline, ApiError> {
    s.warehouse
        .pipeline(tenant, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("pipeline '{name}'")))
}

/// `GET /v1/pipelines/{name}`
#[utoipa::path(
    get,
    path = "/v1/pipelines/{name}",
    tag = "pipelines",
    summary = "Read a pipeline (secrets named, never shown)",
    security(("bearer" = ["viewer"])),
    params(("name" = String, Path, description = "The pipeline's name", example = "invoices")),
    responses((status = 200, description = "The pipeline", body = crate::openapi::Pipeline))
)]
pub async fn get_pipeline<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(name): Path<String>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Viewer)?;
    ok(pipeline_json(&stored(&s, tenant, &name).await?))
}

/// `PUT /v1/pipelines/{name}`: replaces the definition. A secret left out of the body keeps
/// its stored value while the source still points at the same host, port, user and
/// database (or service account); otherwise it must be sent again. `null` removes one.
#[utoipa::path(
    put,
    path = "/v1/pipelines/{name}",
    tag = "pipelines",
    summary = "Replace a pipeline; secrets left out keep their values",
    security(("bearer" = ["admin"])),
    params(("name" = String, Path, description = "The pipeline's name", example = "invoices")),
    request_body(content = sluice_pipelines::PipelineSpec, description = "The pipeline file's fields as JSON; a secret left out keeps its value while the source points at the same place, `null` removes it"),
    responses((status = 200, description = "Replaced", body = crate::openapi::Pipeline))
)]
pub async fn put_pipeline<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Admin)?;
    let before = stored(&s, tenant, &name).await?;
    let cleared: Vec<String> = body
        .pointer("/source")
        .and_then(Value::as_object)
        .map(|source| {
            source
                .iter()
                .filter(|(_, v)| v.is_null())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut spec = parse_pipeline(body, tenant)?;
    if spec.name != name {
        return Err(ApiError::bad_request(format!(
            "the body names pipeline '{}', the path '{name}'",
            spec.name
        )));
    }
    s.confinement.check_spec(&mut spec)?;
    let (fields, secrets) = carry_secrets(&before, &spec, &cleared)?;
    PipelineSpec::from_stored(&fields, &secrets)?;
    let change = PipelineChange {
        actor: caller.key_id.clone(),
        action: "pipeline.update",
        origin: PipelineOrigin::Api,
        detail: json!({
            "before": before.spec, "after": fields,
            "secrets": secrets.keys().collect::<Vec<_>>(),
        }),
    };
    s.warehouse
        .save_pipeline(tenant, &name, &fields, &secrets, &change)
        .await?;
    ok(pipeline_json(&stored(&s, tenant, &name).await?))
}

/// `DELETE /v1/pipelines/{name}`
#[utoipa::path(
    delete,
    path = "/v1/pipelines/{name}",
    tag = "pipelines",
    summary = "Delete a pipeline",
    security(("bearer" = ["admin"])),
    params(("name" = String, Path, description = "The pipeline's name", example = "invoices")),
    responses((status = 204, description = "Deleted"))
)]
pub async fn delete_pipeline<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(name): Path<String>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Admin)?;
    let before = stored(&s, tenant, &name).await?;
    s.warehouse.delete_pipeline(tenant, &name).await?;
    audit(
        &s,
        &caller,
        "pipeline.delete",
        &name,
        json!({ "before": before.spec }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/pipelines/{name}/health`: the source's check (see [`source_health`]).
#[utoipa::path(
    get,
    path = "/v1/pipelines/{name}/health",
    tag = "pipelines",
    summary = "Check the pipeline's source",
    security(("bearer" = ["viewer"])),
    params(("name" = String, Path, description = "The pipeline's name", example = "invoices")),
    responses((status = 200, description = "The check (ok or not)", body = crate::openapi::SourceHealth))
)]
pub async fn pipeline_health<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(name): Path<String>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Viewer)?;
    let p = stored(&s, tenant, &name).await?;
    ok(match source_health(&s, &p).await {
        Ok((detail, ms)) => json!({ "pipeline": name, "ok": true, "detail": detail,
                         "latency_ms": ms }),
        Err(e) => json!({ "pipeline": name, "ok": false, "error": e }),
    })
}

/// How long one source check may take.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a check's answer is reused: health is read by every viewer's page, and each
/// check costs the source a connection or a request of its budget.
const HEALTH_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// A pipeline's source check, within [`CHECK_TIMEOUT`], reused for [`HEALTH_TTL`], under
/// the pipeline's confinement, never spending credentials (no token refresh).
async fn source_health<W: Store>(
    s: &AppState<W>,
    p: &StoredPipeline,
) -> Result<(String, u64), String> {
    let key = (p.tenant.clone(), p.name.clone(), p.updated_at);
    if let Some(hit) = s.health.get(&key, HEALTH_TTL) {
        return hit;
    }
    let checked = async {
        let spec = PipelineSpec::from_stored(&p.spec, &p.secrets).map_err(|e| e.to_string())?;
        let reach = s.confinement.reach(&p.tenant, p.origin);
        let source = PipelineSource::for_pipeline(&spec, s.warehouse.clone(), &reach)
            .map_err(|e| e.to_string())?
            .for_health_read();
        match tokio::time::timeout(CHECK_TIMEOUT, source.check()).await {
            Ok(Ok(h)) => Ok((h.detail, h.latency.as_millis() as u64)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
        }
    }
    .await;
    s.health.put(key, checked.clone());
    checked
}

/// Queues a sync of pipeline `name` (behind a running one; joining one queued and not
/// started; an idempotency `key` names an earlier trigger's run); audits a new one. The
/// API's and the console's `Sync now`.
pub async fn queue_sync<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    name: &str,
    key: Option<String>,
    request_id: String,
) -> Result<sluice_workers::Triggered, ApiError> {
    let tenant = caller.tenant_with(Role::Operator)?;
    stored(s, tenant, name).await?;
    let triggered = s
        .queues
        .trigger(&TriggerRequest {
            tenant: tenant.to_string(),
            pipeline: name.to_string(),
            trigger: RunTrigger::Api,
            idempotency_key: key.clone().map(IdempotencyKey::Client),
            correlation_id: Some(request_id),
            file: None,
        })
        .await?;
    if triggered.outcome == TriggerOutcome::Enqueued {
        audit(
            s,
            caller,
            "pipeline.sync",
            name,
            json!({ "run_id": triggered.run_id, "idempotency_key": key }),
        )
        .await?;
    }
    Ok(triggered)
}

/// `POST /v1/pipelines/{name}/sync`: 202 with the run; honours `Idempotency-Key`; joins a
/// sync of the pipeline queued and not started, or queues one behind a running one.
#[utoipa::path(
    post,
    path = "/v1/pipelines/{name}/sync",
    tag = "pipelines",
    summary = "Queue a sync: 202 with the run; Idempotency-Key honoured; joins a queued sync, or queues one behind a running sync",
    security(("bearer" = ["operator"])),
    params(("name" = String, Path, description = "The pipeline's name", example = "invoices"), ("Idempotency-Key" = Option<String>, Header, description = "1-200 visible characters: the same key names the same run", min_length = 1, max_length = 200, pattern = "^[\\x21-\\x7e]+$")),
    responses((status = 202, description = "Queued", body = crate::openapi::SyncQueued))
)]
pub async fn sync_pipeline<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(name): Path<String>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Reply {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| (1..=200).contains(&k.len()))
                .ok_or_else(|| {
                    ApiError::bad_request("Idempotency-Key must be 1-200 visible characters")
                })?;
            Some(k.to_string())
        }
    };
    let triggered = queue_sync(&s, &caller, &name, key, request_id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::openapi::SyncQueued {
            url: format!("/v1/runs/{}", triggered.run_id),
            run_id: triggered.run_id,
            outcome: triggered.outcome,
        }),
    )
        .into_response())
}

/// `GET /v1/runs/{id}`: the accounting and quarantine counts per rule.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    summary = "A run's accounting and quarantine counts per rule; for a job's id, the job whole (counts over its attempts) with each attempt beneath",
    security(("bearer" = ["viewer"])),
    params(("id" = String, Path, description = "A run's or a job's id")),
    responses((status = 200, description = "The run", body = RunView))
)]
pub async fn get_run<W: Store>(State(s): Api<W>, caller: Caller, Path(id): Path<String>) -> Reply {
    let tenant = caller.tenant_with(Role::Viewer)?;
    ok(run_json(&s, tenant, &id).await?)
}

/// A run of `tenant` queued and not started, as `GET /v1/runs/{id}` shows it: status
/// `queued`, no counts yet, `started_at` when it was queued.
async fn queued_view<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
    id: &str,
) -> Result<Option<RunView>, ApiError> {
    let Some(q) = s.queues.queued_run(id).await? else {
        return Ok(None);
    };
    if q.tenant != tenant.as_str() {
        return Ok(None);
    }
    let entity = s
        .warehouse
        .pipeline(tenant, &q.pipeline)
        .await?
        .and_then(|p| {
            p.spec
                .get("entity")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_default();
    Ok(Some(RunView {
        run_id: q.run_id,
        tenant: q.tenant,
        pipeline: q.pipeline,
        entity,
        trigger: q.trigger,
        status: RunStatus::Queued,
        started_at: q.queued_at,
        finished_at: None,
        rows_read: 0,
        loaded: 0,
        inserted: 0,
        updated: 0,
        unchanged: 0,
        quarantined: 0,
        deduplicated: 0,
        rules_hash: String::new(),
        error: None,
        attempt: None,
        job_id: None,
        attempts: None,
        quarantined_by_rule: None,
    }))
}

/// A run as `GET /v1/runs/{id}` shows it. A job's id (attempt 1's) gives the job as a whole:
/// counts summed over its attempts, the last attempt's status, each attempt beneath
/// (`attempts`). An attempt's id (`<job>.<n>`) gives that attempt alone, with `job_id`.
/// Both carry `quarantined_by_rule` over what they cover.
pub async fn run_json<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
    id: &str,
) -> Result<RunView, ApiError> {
    let missing = || ApiError::not_found(format!("run {id}"));
    // A tenant with no warehouse yet has no runs in it; its first run may be queued.
    let found = match s.warehouse.job(tenant, id).await {
        Err(e) if e.kind() == sluice_engine::ErrorKind::NotFound => None,
        other => other?,
    };
    let Some(job) = found else {
        return queued_view(s, tenant, id).await?.ok_or_else(missing);
    };
    let job_id = sluice_engine::JobLedger::job_id(id);
    let (mut v, covered): (RunView, Vec<&str>) = if job_id == id {
        (
            job.view(),
            job.attempts.iter().map(|a| a.run_id.as_str()).collect(),
        )
    } else {
        let one = job
            .attempts
            .iter()
            .find(|a| a.run_id == id)
            .ok_or_else(missing)?;
        let v = RunView {
            job_id: Some(job_id.to_string()),
            ..one.view()
        };
        (v, vec![id])
    };
    let mut by_rule = std::collections::BTreeMap::<String, u64>::new();
    for run in covered {
        for (rule, n) in s.warehouse.run_rule_counts(tenant, run).await? {
            *by_rule.entry(rule).or_default() += n;
        }
    }
    v.quarantined_by_rule = Some(by_rule);
    Ok(v)
}

/// Query of `GET /v1/runs`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only this pipeline's runs.
    pub pipeline: Option<String>,
    /// Only runs in this state.
    #[param(value_type = Option<RunStatus>)]
    pub status: Option<String>,
    /// Runs started at or after (RFC 3339).
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Runs started before (RFC 3339).
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// Page size (1-500).
    #[param(minimum = 1, maximum = 500, example = 50)]
    pub limit: Option<u32>,
    /// The last run id of the previous page.
    pub cursor: Option<String>,
}

/// How far back `GET /v1/runs` looks (newest runs first).
const RUNS_WINDOW: u32 = 10_000;

/// `GET /v1/runs`: newest first, paged by cursor.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    summary = "List runs (pipeline, status, from, to; paged by cursor)",
    security(("bearer" = ["viewer"])),
    params(RunsQuery),
    responses((status = 200, description = "A page of runs", body = crate::openapi::RunPage))
)]
pub async fn list_runs<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Query(q): Query<RunsQuery>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Viewer)?;
    let (page, next) = runs_page(&s, tenant, &q).await?;
    ok(json!({
        "items": page.iter().map(RunLedger::view).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

/// One page of runs matching `q`, newest first, and the next page's cursor.
pub async fn runs_page<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
    q: &RunsQuery,
) -> Result<(Vec<RunLedger>, Option<String>), ApiError> {
    let status = q
        .status
        .as_deref()
        .map(|st| {
            RunStatus::parse(st).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown status {st:?}: queued, running, succeeded or failed"
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500) as usize;
    let all = s
        .warehouse
        .runs(tenant, q.pipeline.as_deref(), RUNS_WINDOW)
        .await?;
    let mut items = all
        .iter()
        .filter(|r| status.is_none_or(|st| r.status == st))
        .filter(|r| q.from.is_none_or(|f| r.started_at >= f))
        .filter(|r| q.to.is_none_or(|t| r.started_at < t))
        .skip_while(|r| q.cursor.as_deref().is_some_and(|c| r.run_id != c))
        .skip(usize::from(q.cursor.is_some()));
    let page: Vec<RunLedger> = items.by_ref().take(limit).cloned().collect();
    let next = (items.next().is_some())
        .then(|| page.last().map(|r| r.run_id.clone()))
        .flatten();
    Ok((page, next))
}

/// How far back `GET /v1/dead-letters` looks (newest first).
const DEAD_LETTER_WINDOW: u32 = 10_000;

/// `GET /v1/dead-letters`: newest first, paged by cursor.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "dead letters",
    summary = "List dead jobs",
    security(("bearer" = ["operator"])),
    params(Page),
    responses((status = 200, description = "A page of dead jobs", body = crate::openapi::DeadLetterPage))
)]
pub async fn list_dead_letters<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Operator)?;
    let all = s.warehouse.dead_letters(tenant, DEAD_LETTER_WINDOW).await?;
    let (items, next) = page_of(&all, |d| d.id.as_str(), &page, 50);
    ok(json!({ "items": items, "next_cursor": next }))
}

/// `GET /v1/dead-letters/{id}`
#[utoipa::path(
    get,
    path = "/v1/dead-letters/{id}",
    tag = "dead letters",
    summary = "A dead job with every attempt",
    security(("bearer" = ["operator"])),
    params(("id" = String, Path, description = "The dead letter's id")),
    responses((status = 200, description = "The dead job", body = sluice_engine::control::DeadLetter))
)]
pub async fn get_dead_letter<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Operator)?;
    let letter = s
        .warehouse
        .dead_letter(tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("dead letter {id}")))?;
    ok(json!(letter))
}

/// `POST /v1/dead-letters/{id}/replay`: queues the dead sync again (trigger `replay`), once
/// (see `Queues::replay_dead_letter`, which the CLI shares).
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{id}/replay",
    tag = "dead letters",
    summary = "Queue a dead sync again, once: 202",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The dead letter's id")),
    responses((status = 202, description = "Queued", body = crate::openapi::ReplayQueued))
)]
pub async fn replay_dead_letter<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
) -> Reply {
    let run_id = replay_dead(&s, &caller, &id, request_id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::openapi::ReplayQueued {
            run_id: run_id.to_string(),
            url: format!("/v1/runs/{run_id}"),
        }),
    )
        .into_response())
}

/// Queues dead letter `id` again, once, and audits it; the run's id.
pub async fn replay_dead<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    id: &str,
    request_id: String,
) -> Result<String, ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    let triggered = s
        .queues
        .replay_dead_letter(&*s.warehouse, tenant, id, Some(request_id))
        .await?;
    audit(
        s,
        caller,
        "dead_letter.replay",
        id,
        json!({ "run_id": triggered.run_id }),
    )
    .await?;
    Ok(triggered.run_id)
}

/// Body of `POST /v1/keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyBody {
    /// What the key may do.
    pub role: Role,
    /// A platform key names the tenant; a tenant admin's key may only name its own.
    pub tenant: Option<String>,
    /// A label.
    pub name: Option<String>,
}

/// `POST /v1/keys`: the key is in the answer, once.
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    summary = "Make an API key; shown once",
    security(("bearer" = ["admin"])),
    request_body = NewKeyBody,
    responses((status = 201, description = "The key, shown this once", body = crate::openapi::NewKey))
)]
pub async fn create_key<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Json(body): Json<NewKeyBody>,
) -> Reply {
    let made = make_key(&s, &caller, body).await?;
    let mut v = json!(made.record);
    v["key"] = Value::String(made.secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Makes and stores a key as `caller` may (audited); the secret is in the answer, once.
pub async fn make_key<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    body: NewKeyBody,
) -> Result<NewApiKey, ApiError> {
    let tenant = match (&caller.tenant, caller.role) {
        (None, Role::Platform) => body
            .tenant
            .as_deref()
            .map(TenantSlug::parse)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        (Some(own), _) => {
            caller.tenant_with(Role::Admin)?;
            if body.role == Role::Platform {
                return Err(ApiError::forbidden(
                    "only a platform key makes platform keys",
                ));
            }
            if body.tenant.as_deref().is_some_and(|t| t != own.as_str()) {
                return Err(ApiError::not_found("tenant"));
            }
            Some(own.clone())
        }
        (None, _) => return Err(ApiError::forbidden("not allowed")),
    };
    let made = NewApiKey::generate(tenant.as_ref(), body.role, body.name.as_deref())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    s.warehouse.create_key(&made.record).await?;
    s.warehouse
        .record_audit(
            &caller.key_id,
            "key.create",
            tenant.as_ref(),
            &made.record.id,
            &json!({ "role": made.record.role, "prefix": made.record.prefix }),
        )
        .await?;
    Ok(made)
}

/// `GET /v1/keys`: the tenant's keys (a platform key: platform keys), never their secrets;
/// newest first, paged by cursor.
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    summary = "List API keys (a platform key: platform keys)",
    security(("bearer" = ["admin"])),
    params(Page),
    responses((status = 200, description = "A page of keys", body = crate::openapi::KeyPage))
)]
pub async fn list_keys<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Reply {
    let tenant = match caller.role {
        Role::Platform => None,
        _ => Some(caller.tenant_with(Role::Admin)?.clone()),
    };
    let keys = s.warehouse.keys(tenant.as_ref()).await?;
    let (items, next) = page_of(&keys, |k| k.id.as_str(), &page, 100);
    ok(json!({ "items": items, "next_cursor": next }))
}

/// `DELETE /v1/keys/{id}`: revokes.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    summary = "Revoke an API key",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 204, description = "Revoked"))
)]
pub async fn revoke_key<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
) -> Reply {
    revoke(&s, &caller, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Revokes key `id` as `caller` may (audited).
pub async fn revoke<W: Store>(s: &AppState<W>, caller: &Caller, id: &str) -> Result<(), ApiError> {
    let tenant = match caller.role {
        Role::Platform => None,
        _ => Some(caller.tenant_with(Role::Admin)?.clone()),
    };
    if !s.warehouse.revoke_key(tenant.as_ref(), id).await? {
        return Err(ApiError::not_found(format!("key {id}")));
    }
    s.warehouse
        .record_audit(
            &caller.key_id,
            "key.revoke",
            tenant.as_ref(),
            id,
            &json!({}),
        )
        .await?;
    Ok(())
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The last entry id of the previous page (its `next_cursor`).
    cursor: Option<i64>,
    /// Page size (1-1000).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    limit: Option<u32>,
}

/// `GET /v1/audit`: newest first.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "keys",
    summary = "The audit log, newest first",
    security(("bearer" = ["admin"])),
    params(AuditQuery),
    responses((status = 200, description = "A page of entries", body = crate::openapi::AuditPage))
)]
pub async fn audit_log<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Admin)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = s.warehouse.audit_log(tenant, q.cursor, limit).await?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|e| e.id))
        .flatten();
    ok(json!({ "items": items, "next_cursor": next }))
}

/// Query of `GET /v1/quarantine`.
#[derive(Debug, Default, Clone, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct QuarantineQuery {
    /// Only rows read by this run.
    pub run_id: Option<String>,
    /// Only rows of this pipeline.
    pub pipeline: Option<String>,
    /// Only rows meant to become this entity.
    pub entity: Option<String>,
    /// Only rows that failed this rule.
    pub rule: Option<String>,
    /// Only rows with an error on this field.
    pub field: Option<String>,
    /// Only rows in this state.
    #[param(value_type = Option<QuarantineStatus>)]
    pub status: Option<String>,
    /// Page size (1-1000).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// The last row id of the previous page.
    pub cursor: Option<String>,
}

fn row_json(r: &QuarantinedRow) -> crate::openapi::QuarantinedRow {
    crate::openapi::QuarantinedRow {
        id: r.id.clone(),
        run_id: r.run_id.clone(),
        status: r.status,
        pipeline: r.pipeline.clone(),
        entity: r.entity.clone(),
        position: r.position.clone(),
        raw: r.raw.clone(),
        errors: r.errors.clone(),
        created_at: r.created_at,
    }
}

/// `GET /v1/quarantine`: oldest first, paged by cursor.
///
/// With `Accept: text/csv` or the XLSX media type, every row matching the filter (from
/// `cursor` on; at most 100,000) as one table.
#[utoipa::path(
    get,
    path = "/v1/quarantine",
    tag = "quarantine",
    summary = "List quarantined rows (run_id, pipeline, entity, rule, field, status; paged by cursor)",
    security(("bearer" = ["analyst"])),
    params(QuarantineQuery),
    responses((status = 200, description = "A page of rows (JSON), or every matching row as CSV or XLSX by `Accept`", content((crate::openapi::QuarantinePage = "application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"))))
)]
pub async fn list_quarantine<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<QuarantineQuery>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    if accepted(&headers) == export::Format::Json {
        let (rows, next) = quarantine_page(&s, tenant, q).await?;
        return ok(
            json!({ "items": rows.iter().map(row_json).collect::<Vec<_>>(), "next_cursor": next }),
        );
    }
    let mut all = Vec::new();
    let mut q = q;
    q.limit = Some(1000);
    loop {
        let (rows, next) = quarantine_page(&s, tenant, q.clone()).await?;
        all.extend(rows);
        if all.len() > EXPORT_ROWS {
            return Err(ApiError::bad_request(format!(
                "more than {EXPORT_ROWS} rows match: narrow the filter (pipeline, run_id, rule, field, status)"
            )));
        }
        match next {
            Some(cursor) => q.cursor = Some(cursor),
            None => break,
        }
    }
    negotiated(
        &headers,
        || json!({}),
        || export::quarantine_table(&all),
        "quarantine",
    )
}

/// One page of quarantined rows matching `q`, oldest first, and the next page's cursor.
pub async fn quarantine_page<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
    q: QuarantineQuery,
) -> Result<(Vec<QuarantinedRow>, Option<String>), ApiError> {
    let status = q
        .status
        .as_deref()
        .map(|st| {
            QuarantineStatus::parse(st).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown status {st:?}: pending, fixed, replayed or ignored"
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = s
        .warehouse
        .quarantined(
            tenant,
            &QuarantineFilter {
                run_id: q.run_id,
                status,
                rule: q.rule,
                limit: Some(limit),
                pipeline: q.pipeline,
                entity: q.entity,
                field: q.field,
                after: q.cursor,
            },
        )
        .await?;
    let next = (rows.len() == limit as usize)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    Ok((rows, next))
}

/// `GET /v1/quarantine/stats`
#[utoipa::path(
    get,
    path = "/v1/quarantine/stats",
    tag = "quarantine",
    summary = "Quarantined rows by rule, field and status",
    security(("bearer" = ["analyst"])),
    responses((status = 200, description = "The counts", body = sluice_engine::quarantine::QuarantineStats))
)]
pub async fn quarantine_stats<W: Store>(State(s): Api<W>, caller: Caller) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    let stats = s
        .quarantine_stats
        .get(tenant.as_str(), || s.warehouse.quarantine_stats(tenant))
        .await?;
    ok(json!(stats))
}

async fn quarantined<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
    id: &str,
) -> Result<QuarantinedRow, ApiError> {
    s.warehouse
        .quarantined_row(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("quarantined row {id}")))
}

/// `GET /v1/quarantine/{id}`
#[utoipa::path(
    get,
    path = "/v1/quarantine/{id}",
    tag = "quarantine",
    summary = "A quarantined row: raw values, errors, position",
    security(("bearer" = ["analyst"])),
    params(("id" = String, Path, description = "The row's id")),
    responses((status = 200, description = "The row", body = crate::openapi::QuarantinedRow))
)]
pub async fn get_quarantined<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    ok(row_json(&quarantined(&s, tenant, &id).await?))
}

/// Body of `PATCH /v1/quarantine/{id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"raw": {"Currency": "USD"}}))]
pub struct FixBody {
    /// Source column -> new value (a string, number, boolean or null); the columns left
    /// out keep their values.
    #[schema(additional_properties = true)]
    raw: serde_json::Map<String, Value>,
}

/// `PATCH /v1/quarantine/{id}`: replaces raw values (the columns given; others stay) and
/// marks the row fixed, ready to retry.
#[utoipa::path(
    patch,
    path = "/v1/quarantine/{id}",
    tag = "quarantine",
    summary = "Fix raw values; audited before/after",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The row's id")),
    request_body = FixBody,
    responses((status = 200, description = "The fixed row", body = crate::openapi::QuarantinedRow))
)]
pub async fn fix_quarantined<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<FixBody>,
) -> Reply {
    ok(row_json(&fix_row(&s, &caller, &id, body.raw).await?))
}

/// Replaces the raw values of quarantined row `id` named in `changes` (the others stay)
/// and marks it fixed; audited with before and after.
pub async fn fix_row<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    id: &str,
    changes: serde_json::Map<String, Value>,
) -> Result<QuarantinedRow, ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    let current = quarantined(s, tenant, id).await?;
    if let Some((k, _)) = changes.iter().find(|(_, v)| v.is_object() || v.is_array()) {
        return Err(ApiError::bad_request(format!(
            "raw value of {k:?} must be a string, number, boolean or null"
        )));
    }
    let mut raw = current.raw.clone();
    for (k, v) in changes {
        raw.insert(k, v);
    }
    let before = s
        .warehouse
        .fix_quarantined(tenant, id, &raw)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "quarantined row {id} is {}: only pending or fixed rows can be fixed",
                    current.status.as_str()
                ),
            )
        })?;
    audit(
        s,
        caller,
        "quarantine.fix",
        id,
        json!({ "before": before.raw, "after": raw }),
    )
    .await?;
    quarantined(s, tenant, id).await
}

/// Body of `POST /v1/quarantine/{id}/ignore`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"reason": "a test invoice, never sent"}))]
pub struct IgnoreBody {
    /// Why the row is set aside (not empty).
    reason: String,
}

/// `POST /v1/quarantine/{id}/ignore`
#[utoipa::path(
    post,
    path = "/v1/quarantine/{id}/ignore",
    tag = "quarantine",
    summary = "Set a row aside with a reason",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The row's id")),
    request_body = IgnoreBody,
    responses((status = 200, description = "The row, ignored", body = crate::openapi::QuarantinedRow))
)]
pub async fn ignore_quarantined<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<IgnoreBody>,
) -> Reply {
    ok(row_json(&ignore_row(&s, &caller, &id, &body.reason).await?))
}

/// Sets quarantined row `id` aside for `reason`; audited.
pub async fn ignore_row<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    id: &str,
    reason: &str,
) -> Result<QuarantinedRow, ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    if reason.trim().is_empty() {
        return Err(ApiError::bad_request("give a reason"));
    }
    let current = quarantined(s, tenant, id).await?;
    s.warehouse
        .ignore_quarantined(tenant, id, reason)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "quarantined row {id} is {}: only pending or fixed rows can be ignored",
                    current.status.as_str()
                ),
            )
        })?;
    audit(
        s,
        caller,
        "quarantine.ignore",
        id,
        json!({ "before": current.status, "after": "ignored", "reason": reason }),
    )
    .await?;
    quarantined(s, tenant, id).await
}

async fn queue_replay<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    tenant: &TenantSlug,
    selection: ReplaySelection,
    request_id: String,
) -> Result<String, ApiError> {
    s.warehouse
        .pipeline(tenant, &selection.pipeline)
        .await?
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "pipeline '{}' is not registered any more: its rows cannot be replayed",
                selection.pipeline
            ))
        })?;
    let queued = s
        .queues
        .replay(tenant.as_str(), selection.clone(), Some(request_id))
        .await?;
    audit(
        s,
        caller,
        "quarantine.retry",
        &queued.run_id,
        json!({ "selection": selection }),
    )
    .await?;
    Ok(queued.run_id)
}

fn replay_queued(run_id: &str) -> Reply {
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::openapi::ReplayQueued {
            run_id: run_id.to_string(),
            url: format!("/v1/runs/{run_id}"),
        }),
    )
        .into_response())
}

/// `POST /v1/quarantine/{id}/retry`: replays one row (a run of its own).
#[utoipa::path(
    post,
    path = "/v1/quarantine/{id}/retry",
    tag = "quarantine",
    summary = "Replay one row: 202",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The row's id")),
    responses((status = 202, description = "Queued", body = crate::openapi::ReplayQueued))
)]
pub async fn retry_quarantined<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
) -> Reply {
    let run_id = retry_rows(
        &s,
        &caller,
        RetryBody {
            ids: vec![id],
            ..RetryBody::default()
        },
        request_id,
    )
    .await?;
    replay_queued(&run_id)
}

/// Body of `POST /v1/quarantine/retry`: rows by id, or every pending/fixed row of a
/// pipeline matching a filter.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    /// These rows (of one pipeline).
    #[serde(default)]
    pub ids: Vec<String>,
    /// Or every pending or fixed row of this pipeline...
    pub pipeline: Option<String>,
    /// ...read by this run...
    pub run_id: Option<String>,
    /// ...that failed this rule.
    pub rule: Option<String>,
}

/// `POST /v1/quarantine/retry`: one replay run for a batch.
#[utoipa::path(
    post,
    path = "/v1/quarantine/retry",
    tag = "quarantine",
    summary = "Replay rows by ids or by filter as one run: 202",
    security(("bearer" = ["admin"])),
    request_body = RetryBody,
    responses((status = 202, description = "Queued", body = crate::openapi::ReplayQueued))
)]
pub async fn retry_batch<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    Json(body): Json<RetryBody>,
) -> Reply {
    let run_id = retry_rows(&s, &caller, body, request_id).await?;
    replay_queued(&run_id)
}

/// Queues one replay run of the rows `body` selects; the run's id.
pub async fn retry_rows<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    body: RetryBody,
    request_id: String,
) -> Result<String, ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    let selection = if body.ids.is_empty() {
        let pipeline = body.pipeline.ok_or_else(|| {
            ApiError::bad_request("give `ids`, or a `pipeline` (with `run_id` / `rule` to narrow)")
        })?;
        ReplaySelection {
            pipeline,
            ids: Vec::new(),
            run_id: body.run_id,
            rule: body.rule,
        }
    } else {
        let mut pipeline: Option<String> = None;
        for id in &body.ids {
            let row = quarantined(s, tenant, id).await?;
            match &pipeline {
                Some(p) if *p != row.pipeline => {
                    return Err(ApiError::bad_request(
                        "the rows belong to several pipelines: retry each pipeline's rows apart",
                    ));
                }
                _ => pipeline = Some(row.pipeline),
            }
        }
        ReplaySelection {
            pipeline: pipeline.unwrap_or_default(),
            ids: body.ids,
            run_id: None,
            rule: None,
        }
    };
    queue_replay(s, caller, tenant, selection, request_id).await
}

/// Body of `POST /v1/tenants`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"slug": "initech", "name": "Initech"}))]
pub struct NewTenantBody {
    /// Lower-case letters, digits, `-` and `_`.
    slug: String,
    /// A display name (the slug when left out).
    name: Option<String>,
}

/// `POST /v1/tenants` (platform key): creates a tenant; its first key comes from
/// `POST /v1/keys` with the same platform key.
#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    summary = "Create a tenant",
    security(("bearer" = ["platform"])),
    request_body = NewTenantBody,
    responses((status = 201, description = "Created", body = crate::openapi::Tenant))
)]
pub async fn create_tenant<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Json(body): Json<NewTenantBody>,
) -> Reply {
    if caller.role != Role::Platform {
        return Err(ApiError::forbidden(
            "only a platform key provisions tenants",
        ));
    }
    let slug = TenantSlug::parse(&body.slug).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let name = body.name.unwrap_or_else(|| slug.to_string());
    if !s.warehouse.provision_tenant(&slug, &name).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("tenant '{slug}' exists"),
        ));
    }
    s.warehouse
        .record_audit(
            &caller.key_id,
            "tenant.create",
            Some(&slug),
            slug.as_str(),
            &json!({ "name": name }),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(crate::openapi::Tenant {
            slug: slug.to_string(),
            name,
        }),
    )
        .into_response())
}

/// `GET /v1/connectors/status`: every pipeline's source health, last run, last success and
/// next scheduled run. Sources are checked concurrently, each within 5 s.
#[utoipa::path(
    get,
    path = "/v1/connectors/status",
    tag = "pipelines",
    summary = "Every pipeline's health, last run, last success and next scheduled run",
    security(("bearer" = ["viewer"])),
    responses((status = 200, description = "One per pipeline", body = crate::openapi::ConnectorStatuses))
)]
pub async fn connectors_status<W: Store>(State(s): Api<W>, caller: Caller) -> Reply {
    let tenant = caller.tenant_with(Role::Viewer)?;
    ok(json!({ "items": pipeline_statuses(&s, tenant).await? }))
}

/// Every pipeline's source health, last run, last success and next scheduled run, as
/// `GET /v1/connectors/status` lists them.
pub async fn pipeline_statuses<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
) -> Result<Vec<Value>, ApiError> {
    let pipelines = s.warehouse.pipelines(tenant).await?;
    let now = chrono::Utc::now();
    let checks = pipelines.iter().map(|p| source_health(s, p));
    let health = futures_util::future::join_all(checks).await;
    let mut items = Vec::with_capacity(pipelines.len());
    for (p, h) in pipelines.iter().zip(health) {
        let runs = s.warehouse.runs(tenant, Some(&p.name), 50).await?;
        let last_success = runs.iter().find(|r| r.status == RunStatus::Succeeded);
        let next = sluice_pipelines::spec::ScheduleSpec::of_stored(&p.spec)
            .and_then(|c| c.find_next_occurrence(&now, false).ok());
        items.push(json!({
            "pipeline": p.name,
            "health": match h {
                Ok((detail, ms)) => json!({ "ok": true, "detail": detail, "latency_ms": ms }),
                Err(e) => json!({ "ok": false, "error": e }),
            },
            "last_run": runs.first().map(RunLedger::view),
            "last_success": last_success.map(|r| json!({ "run_id": r.run_id, "finished_at": r.finished_at })),
            "next_run": next,
        }));
    }
    Ok(items)
}

/// Query of the finance reports over a period.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PeriodQuery {
    /// The first day of the period.
    #[param(example = "2026-01-01")]
    from: chrono::NaiveDate,
    /// The last day of the period (on or after `from`).
    #[param(example = "2026-12-31")]
    to: chrono::NaiveDate,
}

/// A finance report's error as the API answers it.
pub fn finance_error(e: sluice_finance::FinanceError) -> ApiError {
    match e {
        sluice_finance::FinanceError::Warehouse(e) => e.into(),
        e @ sluice_finance::FinanceError::Period { .. } => ApiError::bad_request(e.to_string()),
        e => ApiError::internal(e),
    }
}

/// `GET /v1/finance/profitability?from&to`: per currency, the period's figures and the
/// monthly series.
#[utoipa::path(
    get,
    path = "/v1/finance/profitability",
    tag = "finance",
    summary = "Profitability over from..to per currency: revenue, cogs, gross profit and margin, expenses, net profit, and monthly",
    security(("bearer" = ["analyst"])),
    params(PeriodQuery),
    responses((status = 200, description = "The report (JSON, CSV or XLSX by `Accept`)", content((sluice_finance::ProfitabilityReport = "application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"))))
)]
pub async fn profitability<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<PeriodQuery>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    let r = sluice_finance::profitability_report(&*s.warehouse, tenant, q.from, q.to)
        .await
        .map_err(finance_error)?;
    negotiated(
        &headers,
        || json!(r),
        || export::profitability_table(&r),
        &format!("profitability-{}-{}", q.from, q.to),
    )
}

/// Query of the aging reports.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AsOfQuery {
    /// The day the balances are aged at.
    #[param(example = "2026-12-31")]
    as_of: chrono::NaiveDate,
}

async fn aging_of<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    headers: &HeaderMap,
    side: sluice_engine::finance_rules::AgingSide,
    as_of: chrono::NaiveDate,
) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    let r = sluice_finance::aging_report(&*s.warehouse, tenant, side, as_of)
        .await
        .map_err(finance_error)?;
    let name = match side {
        sluice_engine::finance_rules::AgingSide::Receivable => "ar-aging",
        sluice_engine::finance_rules::AgingSide::Payable => "ap-aging",
    };
    negotiated(
        headers,
        || json!(r),
        || export::aging_table(&r, name),
        &format!("{name}-{as_of}"),
    )
}

/// `GET /v1/finance/ar-aging?as_of`: open invoice balances per currency by bucket, with
/// per-customer rows.
#[utoipa::path(
    get,
    path = "/v1/finance/ar-aging",
    tag = "finance",
    summary = "AR aging as of a date per currency, with per-customer rows",
    security(("bearer" = ["analyst"])),
    params(AsOfQuery),
    responses((status = 200, description = "The report (JSON, CSV or XLSX by `Accept`)", content((sluice_finance::AgingDetail = "application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"))))
)]
pub async fn ar_aging<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<AsOfQuery>,
) -> Reply {
    aging_of(
        &s,
        &caller,
        &headers,
        sluice_engine::finance_rules::AgingSide::Receivable,
        q.as_of,
    )
    .await
}

/// `GET /v1/finance/ap-aging?as_of`: open bill balances per currency by bucket, with
/// per-vendor rows.
#[utoipa::path(
    get,
    path = "/v1/finance/ap-aging",
    tag = "finance",
    summary = "AP aging as of a date per currency, with per-vendor rows",
    security(("bearer" = ["analyst"])),
    params(AsOfQuery),
    responses((status = 200, description = "The report (JSON, CSV or XLSX by `Accept`)", content((sluice_finance::AgingDetail = "application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"))))
)]
pub async fn ap_aging<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<AsOfQuery>,
) -> Reply {
    aging_of(
        &s,
        &caller,
        &headers,
        sluice_engine::finance_rules::AgingSide::Payable,
        q.as_of,
    )
    .await
}

/// `GET /v1/finance/cash-flow?from&to`: per currency, the period's inflow, outflow and net,
/// and the monthly series.
#[utoipa::path(
    get,
    path = "/v1/finance/cash-flow",
    tag = "finance",
    summary = "Cash flow over from..to per currency: inflow, outflow, net, and monthly",
    security(("bearer" = ["analyst"])),
    params(PeriodQuery),
    responses((status = 200, description = "The report (JSON, CSV or XLSX by `Accept`)", content((sluice_finance::CashFlowReport = "application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"))))
)]
pub async fn cash_flow<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<PeriodQuery>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    let r = sluice_finance::cash_flow_report(&*s.warehouse, tenant, q.from, q.to)
        .await
        .map_err(finance_error)?;
    negotiated(
        &headers,
        || json!(r),
        || export::cash_flow_table(&r),
        &format!("cash-flow-{}-{}", q.from, q.to),
    )
}

/// Query of `GET /v1/finance/dashboard`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DashboardQuery {
    /// The day the aging is taken at.
    #[param(example = "2026-12-31")]
    as_of: chrono::NaiveDate,
    /// The first day of the cash flow and profitability period.
    #[param(example = "2026-01-01")]
    from: chrono::NaiveDate,
    /// Its last day (on or after `from`).
    #[param(example = "2026-12-31")]
    to: chrono::NaiveDate,
}

/// `GET /v1/finance/dashboard?as_of&from&to`
#[utoipa::path(
    get,
    path = "/v1/finance/dashboard",
    tag = "finance",
    summary = "Per currency: cash flow, AR/AP aging, profitability and the anomaly count",
    security(("bearer" = ["analyst"])),
    params(DashboardQuery),
    responses((status = 200, description = "The dashboard", body = sluice_finance::Dashboard))
)]
pub async fn dashboard<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    Query(q): Query<DashboardQuery>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    let d = sluice_finance::dashboard(
        &*s.warehouse,
        tenant,
        q.as_of,
        q.from,
        q.to,
        sluice_finance::AnomalyOptions::default(),
    )
    .await
    .map_err(finance_error)?;
    ok(json!(d))
}

/// Query of `GET /v1/finance/anomalies`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AnomalyQuery {
    /// How many median absolute deviations from a counterparty's median make an outlier.
    #[param(example = 3.5)]
    threshold: Option<f64>,
    /// How many documents a counterparty needs before its outliers are looked for.
    #[param(example = 5)]
    min_history: Option<usize>,
    /// Page size (1-1000).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page (`kind:side:document`).
    cursor: Option<String>,
}

/// `GET /v1/finance/anomalies`: paged by cursor (`kind:side:document` of the last item).
///
/// With `Accept: text/csv` or the XLSX media type, every anomaly as one table.
#[utoipa::path(
    get,
    path = "/v1/finance/anomalies",
    tag = "finance",
    summary = "Anomalies (outliers, duplicate doc numbers, overpayments), paged by cursor",
    security(("bearer" = ["analyst"])),
    params(AnomalyQuery),
    responses((status = 200, description = "A page of anomalies (JSON), or all of them as CSV or XLSX by `Accept`", content((crate::openapi::AnomalyPage = "application/json"), ("text/csv"), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"))))
)]
pub async fn anomalies<W: Store>(
    State(s): Api<W>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<AnomalyQuery>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Analyst)?;
    let defaults = sluice_finance::AnomalyOptions::default();
    let options = sluice_finance::AnomalyOptions {
        threshold: q.threshold.unwrap_or(defaults.threshold),
        min_history: q.min_history.unwrap_or(defaults.min_history),
    };
    let found = anomaly_list(&s, tenant, options).await?;
    if accepted(&headers) != export::Format::Json {
        return negotiated(
            &headers,
            || json!({}),
            || export::anomalies_table(&found),
            "anomalies",
        );
    }
    let keyed: Vec<(String, &sluice_finance::Anomaly)> = found
        .iter()
        .map(|a| (format!("{}:{}:{}", a.kind, a.side, a.document), a))
        .collect();
    let page = Page {
        limit: q.limit,
        cursor: q.cursor,
    };
    let (items, next) = page_of(&keyed, |(k, _)| k.as_str(), &page, 100);
    ok(json!({
        "items": items.iter().map(|(_, a)| a).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

/// Every anomaly of the tenant's current data under `options`, computed once per version
/// of the data (see [`crate::state::ComputedLists`]).
pub async fn anomaly_list<W: Store>(
    s: &AppState<W>,
    tenant: &TenantSlug,
    options: sluice_finance::AnomalyOptions,
) -> Result<Arc<Vec<sluice_finance::Anomaly>>, ApiError> {
    // Every page is a slice of one computation over the tenant's current data: the
    // newest run (its id, status and counts) stands for the data's version.
    let newest = s.warehouse.runs(tenant, None, 1).await?;
    let version = newest.first().map_or_else(String::new, |r| {
        format!("{}:{}:{:?}", r.run_id, r.status.as_str(), r.counts)
    });
    let key = format!("{tenant}:{}:{}", options.threshold, options.min_history);
    let found = s
        .anomalies
        .get_or_compute(&key, &version, || {
            sluice_finance::anomalies_report(&*s.warehouse, tenant, options)
        })
        .await
        .map_err(finance_error)?;
    Ok(found)
}
