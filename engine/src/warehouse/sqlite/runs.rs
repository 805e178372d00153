//! The run ledger read back: one run, a tenant's recent runs, the tenants.

use super::SqliteWarehouse;
use crate::error::{EngineError, ErrorKind, Result};
use crate::ledger::RunLedger;
use crate::tenant::TenantSlug;
use crate::warehouse::RunHistory;
use crate::warehouse::rows::ledger_from_row;

impl RunHistory for SqliteWarehouse {
    async fn tenants(&self) -> Result<Vec<TenantSlug>> {
        let dir = self.tenant_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(EngineError::new(
                    ErrorKind::Config,
                    format!("cannot read {}", dir.display()),
                )
                .with_source(e));
            }
        };
        let mut out: Vec<TenantSlug> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                TenantSlug::parse(name.strip_suffix(".sqlite")?).ok()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn run(&self, tenant: &TenantSlug, run_id: &str) -> Result<Option<RunLedger>> {
        let pool = self.pool(tenant, false).await?;
        let row = sqlx::query("SELECT * FROM runs WHERE run_id = ?")
            .bind(run_id)
            .fetch_optional(&pool)
            .await
            .map_err(|e| EngineError::from_sqlx("reading the run ledger", e))?;
        row.map(|r| ledger_from_row(tenant, &r)).transpose()
    }

    async fn runs(
        &self,
        tenant: &TenantSlug,
        pipeline: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunLedger>> {
        let pool = self.pool(tenant, false).await?;
        let rows = sqlx::query("SELECT * FROM runs WHERE (?1 IS NULL OR pipeline = ?1) ORDER BY started_at DESC, run_id DESC LIMIT ?2")
            .bind(pipeline)
            .bind(i64::from(limit))
            .fetch_all(&pool)
            .await
            .map_err(|e| EngineError::from_sqlx("listing runs", e))?;
        rows.iter().map(|r| ledger_from_row(tenant, r)).collect()
    }
}
