//! The OpenAPI 3.1 document, derived by utoipa from the handlers' `#[utoipa::path]`
//! attributes and the types they read and answer. The list of handlers in `lib.rs` builds
//! both the router and this document, so neither can miss a route; schemathesis
//! (`scripts/api-conformance`) checks every answer against it.
//!
//! The answers take their schemas from the types the handlers serialize: the engine's own
//! (a run's view, dead letters, keys, the audit log, the finance reports) and the ones
//! here, for what the routes assemble (a pipeline, a quarantined row, the list pages, the
//! queued answers).

use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::{Modify, ToSchema};

use sluice_engine::RunView;
use sluice_engine::control::{ApiKeyRecord, AuditEntry, DeadLetter, Role};
use sluice_engine::quarantine::{QuarantineStatus, SourcePosition};
use sluice_engine::validate::CellError;

/// The media type of an XLSX workbook.
pub use crate::export::XLSX;

/// An error, as every route answers it (`application/problem+json`, RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"type": "about:blank", "title": "Not Found", "status": 404,
    "detail": "pipeline 'invoices' not found", "correlation_id": "0193a1c2-7d3e-7cc1-9f0e-2b1d4e5f6a7b"}))]
pub struct Problem {
    /// Always `about:blank`: the status says what kind of error it is.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for the person reading it.
    pub detail: String,
    /// The request's id (also in the `X-Request-Id` header), to find it in the logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// `GET /health` and `GET /ready`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct Status {
    /// `ok` (alive) or `ready` (the warehouse and the queue answer).
    pub status: String,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    /// The runs.
    pub items: Vec<RunView>,
    /// The `cursor` of the next page; none on the last.
    pub next_cursor: Option<String>,
}

/// A stored pipeline: its fields (the pipeline file's, as JSON) and the names of its
/// secrets, never their values.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"name": "invoices", "pipeline": {"name": "invoices", "tenant": "acme",
    "entity": "invoices", "source": {"kind": "csv", "path": "invoices.csv"}},
    "secrets": [], "updated_at": "2026-12-05T09:00:00Z"}))]
pub struct Pipeline {
    /// Its name.
    pub name: String,
    /// Its definition, secrets left out.
    pub pipeline: Value,
    /// The names of its secrets.
    pub secrets: Vec<String>,
    /// When it last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A page of pipelines, by name.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelinePage {
    /// The pipelines.
    pub items: Vec<Pipeline>,
    /// The `cursor` of the next page.
    pub next_cursor: Option<String>,
}

/// A source check.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"pipeline": "invoices", "ok": true, "detail": "PostgreSQL 15.8", "latency_ms": 3}))]
pub struct SourceHealth {
    /// The pipeline (on `GET /v1/pipelines/{name}/health`).
    pub pipeline: Option<String>,
    /// Whether the source answered.
    pub ok: bool,
    /// What it answered.
    pub detail: Option<String>,
    /// How long it took.
    pub latency_ms: Option<u64>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// The last successful run of a pipeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct LastSuccess {
    /// The run.
    pub run_id: String,
    /// When it ended.
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// One pipeline's status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorStatus {
    /// The pipeline.
    pub pipeline: String,
    /// Its source's check.
    pub health: SourceHealth,
    /// Its newest run.
    pub last_run: Option<RunView>,
    /// Its newest successful run.
    pub last_success: Option<LastSuccess>,
    /// When the schedule runs it next.
    pub next_run: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every pipeline's status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorStatuses {
    /// One per pipeline.
    pub items: Vec<ConnectorStatus>,
}

/// A queued sync (202).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"run_id": "0193a1c2-7d3e-7cc1-9f0e-2b1d4e5f6a7b", "outcome": "enqueued",
    "url": "/v1/runs/0193a1c2-7d3e-7cc1-9f0e-2b1d4e5f6a7b"}))]
pub struct SyncQueued {
    /// The run to follow.
    pub run_id: String,
    /// Queued anew, joined a queued run, or repeated an earlier trigger with the same
    /// `Idempotency-Key`.
    pub outcome: sluice_workers::TriggerOutcome,
    /// Where to follow it.
    pub url: String,
}

/// An uploaded file's sync: queued (202), or, for a file uploaded before, its earlier run
/// (200, `duplicate`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"run_id": "0193a1c2-7d3e-7cc1-9f0e-2b1d4e5f6a7b",
    "url": "/v1/runs/0193a1c2-7d3e-7cc1-9f0e-2b1d4e5f6a7b",
    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "size": 4096,
    "duplicate": false}))]
pub struct UploadQueued {
    /// The run that reads the file.
    pub run_id: String,
    /// Where to follow it.
    pub url: String,
    /// The file's SHA-256, hex: the same content is the same upload.
    pub sha256: String,
    /// The file's size in bytes (a new upload only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Whether the file was uploaded before (its earlier run is named, nothing is queued).
    pub duplicate: bool,
}

/// A queued replay (202).
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayQueued {
    /// The replay's run.
    pub run_id: String,
    /// Where to follow it.
    pub url: String,
}

/// A quarantined row: its raw values as read, why it was rejected, and where it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuarantinedRow {
    /// Its id.
    pub id: String,
    /// The run that read it.
    pub run_id: String,
    /// Where it stands.
    pub status: QuarantineStatus,
    /// The pipeline that read it.
    pub pipeline: String,
    /// The entity it was meant to become.
    pub entity: String,
    /// Where it was in its source.
    pub position: SourcePosition,
    /// Source column -> value.
    pub raw: serde_json::Map<String, Value>,
    /// Why it was rejected.
    pub errors: Vec<CellError>,
    /// When it was set aside.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A page of quarantined rows, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuarantinePage {
    /// The rows.
    pub items: Vec<QuarantinedRow>,
    /// The `cursor` of the next page.
    pub next_cursor: Option<String>,
}

/// A page of dead letters, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    /// The dead jobs.
    pub items: Vec<DeadLetter>,
    /// The `cursor` of the next page.
    pub next_cursor: Option<String>,
}

/// A page of API keys (never their secrets).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyPage {
    /// The keys.
    pub items: Vec<ApiKeyRecord>,
    /// The `cursor` of the next page.
    pub next_cursor: Option<String>,
}

/// A new API key: the record, and the key itself, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewKey {
    /// Its id.
    pub id: String,
    /// Its public prefix.
    pub prefix: String,
    /// Its tenant; none for a platform key.
    pub tenant: Option<String>,
    /// What it may do.
    pub role: Role,
    /// Its label.
    pub name: Option<String>,
    /// When it was made.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The key, to send as `Authorization: Bearer <key>`; not stored, not shown again.
    pub key: String,
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// The entries.
    pub items: Vec<AuditEntry>,
    /// The `cursor` of the next page.
    pub next_cursor: Option<i64>,
}

/// A page of anomalies.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyPage {
    /// The anomalies.
    pub items: Vec<sluice_finance::Anomaly>,
    /// The `cursor` of the next page.
    pub next_cursor: Option<String>,
}

/// A tenant.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"slug": "initech", "name": "Initech"}))]
pub struct Tenant {
    /// Its slug (lower-case letters, digits, `-` and `_`).
    pub slug: String,
    /// Its display name.
    pub name: String,
}

/// The multipart form of an upload.
#[derive(Debug, ToSchema)]
pub struct Upload {
    /// The CSV or XLSX file.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    pub file: Vec<u8>,
}

/// Adds what the attributes cannot say once for all: the bearer scheme, the problem answer
/// of every operation, and each operation's least role (from its security scopes) in its
/// description.
pub struct Conventions;

impl Modify for Conventions {
    fn modify(&self, api: &mut OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let problem = ResponseBuilder::new()
            .description("An error (every 4xx and 5xx)")
            .content(
                crate::error::PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for item in api.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                add_conventions(op, &problem);
            }
        }
    }
}

fn add_conventions(op: &mut Operation, problem: &utoipa::openapi::Response) {
    op.responses
        .responses
        .entry("default".to_string())
        .or_insert_with(|| problem.clone().into());
    let role = op
        .security
        .as_ref()
        .and_then(|reqs| reqs.first())
        .and_then(|req| serde_json::to_value(req).ok())
        .and_then(|v| v.get("bearer").and_then(|s| s.get(0)).cloned())
        .and_then(|r| r.as_str().map(str::to_string))
        .unwrap_or_else(|| "public (no key)".to_string());
    let least = format!("Least role: {role}.");
    op.description = Some(match op.description.take() {
        Some(d) if !d.is_empty() => format!("{d}\n\n{least}"),
        _ => least,
    });
}

/// An internally tagged enum (`{"kind": "csv", ...}`) comes out of utoipa as a `oneOf` of
/// `allOf: [the variant's struct, {the tag}]`. The struct is `additionalProperties: false`
/// (`deny_unknown_fields`), which forbids the tag beside it, so no body could match; and
/// client generators do not follow that form. Each branch becomes one schema of its own
/// here (`CsvSource`: the struct's fields and the tag), and the `oneOf` gets a
/// discriminator on the tag, which is what serde reads.
pub fn flatten_tagged_branches(doc: &mut Value) {
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut added = Vec::new();
    for (name, schema) in schemas.iter() {
        let Some(branches) = schema.get("oneOf").and_then(Value::as_array) else {
            continue;
        };
        let mut rewritten = Vec::new();
        let mut mapping = serde_json::Map::new();
        let mut tag_name = None;
        for branch in branches {
            let Some(parts) = branch.get("allOf").and_then(Value::as_array) else {
                break;
            };
            let target = parts
                .iter()
                .find_map(|p| p.get("$ref").and_then(Value::as_str))
                .and_then(|r| r.rsplit('/').next());
            let tag = parts.iter().find(|p| p.get("$ref").is_none());
            let (Some(target), Some(tag)) = (target, tag) else {
                break;
            };
            let Some((tag_key, tag_schema)) = tag
                .get("properties")
                .and_then(Value::as_object)
                .and_then(|p| p.iter().next())
            else {
                break;
            };
            let Some(value) = tag_schema
                .get("enum")
                .and_then(|e| e.get(0))
                .and_then(Value::as_str)
            else {
                break;
            };
            let Some(mut merged) = schemas.get(target).cloned() else {
                break;
            };
            let own = format!("{}{}", capitalized(value), name.trim_end_matches("Spec"));
            let obj = merged
                .as_object_mut()
                .expect("a struct's schema is an object");
            obj.entry("properties")
                .or_insert_with(|| serde_json::json!({}))
                .as_object_mut()
                .expect("properties")
                .insert(tag_key.clone(), tag_schema.clone());
            let required = obj
                .entry("required")
                .or_insert_with(|| serde_json::json!([]));
            if let Some(r) = required.as_array_mut() {
                r.insert(0, Value::String(tag_key.clone()));
            }
            if let Some(d) = branch.get("description") {
                obj.insert("description".into(), d.clone());
            }
            let reference = format!("#/components/schemas/{own}");
            mapping.insert(value.to_string(), Value::String(reference.clone()));
            rewritten.push(serde_json::json!({ "$ref": reference }));
            added.push((own, merged));
            tag_name = Some(tag_key.clone());
        }
        if let Some(tag) = tag_name.filter(|_| rewritten.len() == branches.len()) {
            added.push((
                name.clone(),
                serde_json::json!({
                    "oneOf": rewritten,
                    "discriminator": { "propertyName": tag, "mapping": mapping },
                    "description": schema.get("description").cloned().unwrap_or(Value::Null),
                }),
            ));
        }
    }
    for (name, schema) in added {
        schemas.insert(name, schema);
    }
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}
