//! Pipeline definitions per tenant, kept so that workers, the scheduler and the API can run
//! a pipeline by name. A definition is stored as the pipeline's fields (JSON, secrets
//! removed) plus its secrets sealed under the tenant's data key; the store never keeps a
//! secret in clear and needs `SLUICE_MASTER_KEY` only when there are secrets.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::{EngineError, ErrorKind, Result};
use crate::tenant::TenantSlug;

/// A stored pipeline, secrets opened.
#[derive(Clone, PartialEq)]
pub struct StoredPipeline {
    /// The tenant.
    pub tenant: String,
    /// The pipeline's name.
    pub name: String,
    /// Its fields without secrets.
    pub spec: Value,
    /// Its secrets (`source.password`, ...).
    pub secrets: Map<String, Value>,
    /// When it was last saved.
    pub updated_at: DateTime<Utc>,
    /// Who defined it.
    pub origin: PipelineOrigin,
}

/// Who defined a pipeline, and so how far its source may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineOrigin {
    /// A tenant's admin through the API: its files and hosts are confined (SECURITY.md).
    Api,
    /// The user running sluice on their own pipeline file (`sluice trigger`, `sync`).
    Shell,
}

impl PipelineOrigin {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineOrigin::Api => "api",
            PipelineOrigin::Shell => "shell",
        }
    }

    /// From its stored form; anything unknown is confined.
    pub fn parse(s: &str) -> Self {
        if s == "shell" {
            PipelineOrigin::Shell
        } else {
            PipelineOrigin::Api
        }
    }
}

/// A change to a pipeline definition, recorded in the audit log in the same transaction
/// as the change itself.
#[derive(Debug, Clone)]
pub struct PipelineChange {
    /// Who made it: an API key's id, `cli`, or `sluice` for the program's own updates.
    pub actor: String,
    /// `pipeline.create`, `pipeline.update`, `pipeline.token_rotated`, ...
    pub action: &'static str,
    /// Who defines the pipeline from now on.
    pub origin: PipelineOrigin,
    /// The audit entry's detail (never a secret).
    pub detail: Value,
}

impl PipelineChange {
    /// The shell user registering their own pipeline file (`sluice trigger`, `sync`).
    pub fn shell_register(detail: Value) -> Self {
        PipelineChange {
            actor: "cli".into(),
            action: "pipeline.register",
            origin: PipelineOrigin::Shell,
            detail,
        }
    }
}

impl std::fmt::Debug for StoredPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredPipeline")
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// A pipeline that has a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPipeline {
    /// The tenant.
    pub tenant: String,
    /// The pipeline's name.
    pub name: String,
    /// Its cron expression.
    pub cron: String,
}

/// Where pipeline definitions live.
pub trait PipelineStore: Send + Sync {
    /// Stores or replaces a pipeline and records `change` in the audit log, in one
    /// transaction; `secrets` are sealed before they are written.
    fn save_pipeline(
        &self,
        tenant: &TenantSlug,
        name: &str,
        spec: &Value,
        secrets: &Map<String, Value>,
        change: &PipelineChange,
    ) -> impl Future<Output = Result<()>> + Send;

    /// A stored pipeline with its secrets opened, if there is one.
    fn pipeline(
        &self,
        tenant: &TenantSlug,
        name: &str,
    ) -> impl Future<Output = Result<Option<StoredPipeline>>> + Send;

    /// Every pipeline with a `[schedule]`, of every tenant.
    fn scheduled_pipelines(&self) -> impl Future<Output = Result<Vec<ScheduledPipeline>>> + Send;

    /// The tenant's pipelines, by name, secrets opened.
    fn pipelines(
        &self,
        tenant: &TenantSlug,
    ) -> impl Future<Output = Result<Vec<StoredPipeline>>> + Send;

    /// The run that loaded the file with this content hash into the pipeline, if any.
    fn upload_run(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        sha256: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Records that `run_id` loads the file with this hash; returns the run recorded for
    /// it (an earlier one, if another upload of the same file got there first).
    fn record_upload(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        sha256: &str,
        size: u64,
        run_id: &str,
    ) -> impl Future<Output = Result<String>> + Send;

    /// Deletes a pipeline's definition; false when there was none.
    fn delete_pipeline(
        &self,
        tenant: &TenantSlug,
        name: &str,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// The secrets' associated data: a sealed blob only opens for its own tenant and pipeline.
pub(crate) fn secrets_context(tenant: &TenantSlug, name: &str) -> String {
    format!("{tenant}/{name}")
}

pub(crate) fn no_master_key() -> EngineError {
    EngineError::new(
        ErrorKind::Config,
        "set SLUICE_MASTER_KEY (64 hex characters, e.g. `openssl rand -hex 32`): it encrypts tenant keys and pipeline secrets at rest",
    )
}

pub(crate) fn decode_secrets(plain: &[u8]) -> Result<Map<String, Value>> {
    serde_json::from_slice(plain).map_err(|e| {
        EngineError::new(ErrorKind::Warehouse, "stored secrets are not a JSON object")
            .with_source(e)
    })
}
