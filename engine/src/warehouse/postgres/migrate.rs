//! Provisioning and schema versions: the control schema, each tenant's schema and its
//! migrations, under one advisory lock so that concurrent migrators wait for each other.

use super::access::audit;
use super::{PostgresWarehouse, control_error, db, schema_of};
use crate::error::{EngineError, ErrorKind, Result};
use crate::secrets::{DataKey, MasterKey};
use crate::tenant::TenantSlug;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};

pub(super) const CONTROL_MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../../../migrations/postgres/control/0001_control.sql"),
    ),
    (
        2,
        include_str!("../../../../migrations/postgres/control/0002_api_keys.sql"),
    ),
    (
        3,
        include_str!("../../../../migrations/postgres/control/0003_uploads.sql"),
    ),
    (
        4,
        include_str!("../../../../migrations/postgres/control/0004_pipeline_origin.sql"),
    ),
    (
        5,
        include_str!("../../../../migrations/postgres/control/0005_console_sessions.sql"),
    ),
    (
        6,
        include_str!("../../../../migrations/postgres/control/0006_webhooks.sql"),
    ),
];

pub(super) const TENANT_MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../../../migrations/postgres/tenant/0001_warehouse.sql"),
    ),
    (
        2,
        include_str!("../../../../migrations/postgres/tenant/0002_dead_letters.sql"),
    ),
    (
        3,
        include_str!("../../../../migrations/postgres/tenant/0003_quarantine_replay.sql"),
    ),
    (
        4,
        include_str!("../../../../migrations/postgres/tenant/0004_quarantine_ignore.sql"),
    ),
    (
        5,
        include_str!("../../../../migrations/postgres/tenant/0005_finance_rollups.sql"),
    ),
];

/// Serialises migrators across processes (an arbitrary constant, "sluice" in ASCII).
pub(super) const MIGRATION_LOCK: i64 = 0x736c_7569_6365;

/// A tenant as the control schema records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantInfo {
    /// The slug.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Its warehouse schema.
    pub schema: String,
    /// The schema's migration version.
    pub schema_version: i32,
    /// When it was provisioned.
    pub created_at: DateTime<Utc>,
}

impl PostgresWarehouse {
    /// Creates or updates the control schema.
    pub async fn migrate_control(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("starting migration"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db("locking migrations"))?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS sluice; \
             CREATE TABLE IF NOT EXISTS sluice.schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&mut *tx)
        .await
        .map_err(db("creating the control schema"))?;
        let current: i32 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM sluice.schema_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(db("reading the control schema version"))?;
        for &(version, sql) in CONTROL_MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(db(format!("applying control migration {version}")))?;
            sqlx::query("INSERT INTO sluice.schema_migrations (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(db("recording the control migration"))?;
        }
        tx.commit()
            .await
            .map_err(db("committing the control migration"))
    }

    async fn migrate_tenant_in(
        tx: &mut Transaction<'static, Postgres>,
        tenant: &TenantSlug,
        from: i32,
    ) -> Result<i32> {
        let mut version = from;
        for &(v, sql) in TENANT_MIGRATIONS.iter().filter(|(v, _)| *v > from) {
            let sql = sql.replace("__SCHEMA__", &schema_of(tenant));
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut **tx)
                .await
                .map_err(db(format!("applying migration {v} to tenant '{tenant}'")))?;
            version = v;
        }
        sqlx::query("UPDATE sluice.tenants SET schema_version = $1 WHERE slug = $2")
            .bind(version)
            .bind(tenant.as_str())
            .execute(&mut **tx)
            .await
            .map_err(db("recording the tenant schema version"))?;
        Ok(version)
    }

    /// Provisions a tenant: its control row, its wrapped data key and its migrated schema,
    /// all in one transaction. Fails if the tenant exists.
    pub async fn create_tenant(
        &self,
        tenant: &TenantSlug,
        name: &str,
        master: &MasterKey,
    ) -> Result<TenantInfo> {
        self.migrate_control().await?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting tenant creation"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db("locking migrations"))?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sluice.tenants WHERE slug = $1)")
                .bind(tenant.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(db("checking the tenant"))?;
        if exists {
            return Err(EngineError::new(
                ErrorKind::Config,
                format!("tenant '{tenant}' already exists"),
            ));
        }
        let wrapped = master.wrap(&DataKey::generate(), tenant.as_str());
        sqlx::query("INSERT INTO sluice.tenants (slug, name, schema_name, wrapped_key) VALUES ($1, $2, $3, $4)")
            .bind(tenant.as_str())
            .bind(name)
            .bind(format!("tenant_{tenant}"))
            .bind(wrapped)
            .execute(&mut *tx)
            .await
            .map_err(db("recording the tenant"))?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA {}",
            schema_of(tenant)
        )))
        .execute(&mut *tx)
        .await
        .map_err(db(format!("creating the schema of tenant '{tenant}'")))?;
        Self::migrate_tenant_in(&mut tx, tenant, 0).await?;
        audit(
            &mut tx,
            "cli",
            "tenant.create",
            Some(tenant.as_str()),
            tenant.as_str(),
            serde_json::json!({ "name": name }),
        )
        .await?;
        tx.commit()
            .await
            .map_err(db("committing tenant creation"))?;
        self.tenant_info(tenant)
            .await?
            .ok_or_else(|| EngineError::new(ErrorKind::NotFound, "tenant vanished after creation"))
    }

    /// One tenant's control record.
    pub async fn tenant_info(&self, tenant: &TenantSlug) -> Result<Option<TenantInfo>> {
        let row = sqlx::query("SELECT slug, name, schema_name, schema_version, created_at FROM sluice.tenants WHERE slug = $1")
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| control_error("reading the tenant", e))?;
        row.map(|r| tenant_from_row(&r)).transpose()
    }

    /// Every tenant.
    pub async fn list_tenants(&self) -> Result<Vec<TenantInfo>> {
        let rows = sqlx::query("SELECT slug, name, schema_name, schema_version, created_at FROM sluice.tenants ORDER BY slug")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| control_error("listing tenants", e))?;
        rows.iter().map(tenant_from_row).collect()
    }

    /// Brings the control schema and every tenant schema up to date; returns the tenants
    /// migrated with their old and new versions.
    pub async fn migrate_all(&self) -> Result<Vec<(String, i32, i32)>> {
        self.migrate_control().await?;
        let latest = latest_tenant_version();
        let mut migrated = Vec::new();
        for info in self.list_tenants().await? {
            if info.schema_version >= latest {
                continue;
            }
            let tenant = TenantSlug::parse(&info.slug)?;
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(db("starting tenant migration"))?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(db("locking migrations"))?;
            let current: i32 =
                sqlx::query_scalar("SELECT schema_version FROM sluice.tenants WHERE slug = $1")
                    .bind(tenant.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db("reading the tenant version"))?;
            let to = Self::migrate_tenant_in(&mut tx, &tenant, current).await?;
            tx.commit()
                .await
                .map_err(db("committing tenant migration"))?;
            migrated.push((info.slug, current, to));
        }
        Ok(migrated)
    }
}

pub(super) fn latest_tenant_version() -> i32 {
    TENANT_MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

pub(super) fn tenant_from_row(r: &PgRow) -> Result<TenantInfo> {
    Ok(TenantInfo {
        slug: r.try_get("slug").map_err(db("slug"))?,
        name: r.try_get("name").map_err(db("name"))?,
        schema: r.try_get("schema_name").map_err(db("schema_name"))?,
        schema_version: r.try_get("schema_version").map_err(db("schema_version"))?,
        created_at: r.try_get("created_at").map_err(db("created_at"))?,
    })
}
