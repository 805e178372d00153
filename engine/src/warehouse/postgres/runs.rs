//! The run ledger read back: one run, a tenant's recent runs, the tenants.

use super::{PostgresWarehouse, db, table};
use crate::error::Result;
use crate::ledger::RunLedger;
use crate::tenant::TenantSlug;
use crate::warehouse::rows::ledger_from_row;
use crate::warehouse::{LoadStore, RunHistory};
use sqlx::AssertSqlSafe;

impl RunHistory for PostgresWarehouse {
    async fn tenants(&self) -> Result<Vec<TenantSlug>> {
        self.list_tenants()
            .await?
            .iter()
            .map(|t| TenantSlug::parse(&t.slug))
            .collect()
    }

    async fn run(&self, tenant: &TenantSlug, run_id: &str) -> Result<Option<RunLedger>> {
        self.prepare_tenant(tenant).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE run_id = $1",
            table(tenant, "runs")
        )))
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading the run ledger"))?;
        row.map(|r| ledger_from_row(tenant, &r)).transpose()
    }

    async fn runs(
        &self,
        tenant: &TenantSlug,
        pipeline: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunLedger>> {
        self.prepare_tenant(tenant).await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE ($1::text IS NULL OR pipeline = $1) ORDER BY started_at DESC, run_id DESC LIMIT $2",
            table(tenant, "runs")
        )))
        .bind(pipeline)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing runs"))?;
        rows.iter().map(|r| ledger_from_row(tenant, r)).collect()
    }
}
