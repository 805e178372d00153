//! Schema versions of the control database and of each tenant's file.

use super::now_text;
use crate::error::{EngineError, Result};
use crate::tenant::TenantSlug;
use sqlx::sqlite::SqlitePool;

/// Tenant schema migrations, applied in order; each tenant file records its own version.
pub(super) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../../migrations/sqlite/tenant/0001_warehouse.sql"),
    ),
    (
        2,
        include_str!("../../../../migrations/sqlite/tenant/0002_dead_letters.sql"),
    ),
    (
        3,
        include_str!("../../../../migrations/sqlite/tenant/0003_quarantine_replay.sql"),
    ),
    (
        4,
        include_str!("../../../../migrations/sqlite/tenant/0004_quarantine_ignore.sql"),
    ),
    (
        5,
        include_str!("../../../../migrations/sqlite/tenant/0005_finance_state.sql"),
    ),
    (
        6,
        include_str!("../../../../migrations/sqlite/tenant/0006_quarantine_by_run.sql"),
    ),
];

/// Migrations of the control database.
pub(super) const CONTROL_MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../../migrations/sqlite/control/0001_control.sql"),
    ),
    (
        2,
        include_str!("../../../../migrations/sqlite/control/0002_api_keys.sql"),
    ),
    (
        3,
        include_str!("../../../../migrations/sqlite/control/0003_uploads.sql"),
    ),
    (
        4,
        include_str!("../../../../migrations/sqlite/control/0004_pipeline_origin.sql"),
    ),
    (
        5,
        include_str!("../../../../migrations/sqlite/control/0005_console_sessions.sql"),
    ),
    (
        6,
        include_str!("../../../../migrations/sqlite/control/0006_webhooks.sql"),
    ),
];

pub(super) async fn migrate(pool: &SqlitePool, tenant: &TenantSlug) -> Result<()> {
    migrate_with(pool, &format!("tenant '{tenant}'"), MIGRATIONS).await
}

pub(super) async fn migrate_with(
    pool: &SqlitePool,
    what: &str,
    migrations: &[(i64, &'static str)],
) -> Result<()> {
    let ctx = |step: &str| format!("migrating {what}: {step}");
    // Up to date (the common case): no write lock. `BEGIN IMMEDIATE` on every first open
    // made a reader (the API, `runs show`, a test watching a run) wait behind a running
    // load's writes until it ended.
    let latest = migrations.iter().map(|(v, _)| *v).max().unwrap_or(0);
    let applied: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(pool)
        .await
        .unwrap_or(None);
    if applied.is_some_and(|v| v >= latest) {
        return Ok(());
    }
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| EngineError::from_sqlx(ctx("begin"), e))?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| EngineError::from_sqlx(ctx("schema_migrations"), e))?;
    let current: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| EngineError::from_sqlx(ctx("reading version"), e))?;
    for &(version, sql) in migrations.iter().filter(|(v, _)| *v > current) {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| EngineError::from_sqlx(ctx(&format!("applying {version}")), e))?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(now_text())
            .execute(&mut *tx)
            .await
            .map_err(|e| EngineError::from_sqlx(ctx("recording version"), e))?;
    }
    tx.commit()
        .await
        .map_err(|e| EngineError::from_sqlx(ctx("commit"), e))
}

#[cfg(test)]
mod tests {
    use crate::entity::Entity;
    use crate::tenant::TenantSlug;
    use crate::warehouse::LoadStore;
    use crate::warehouse::SqliteWarehouse;

    #[tokio::test]
    async fn migrated_tables_have_exactly_the_entity_columns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let warehouse = SqliteWarehouse::new(dir.path());
        let tenant = TenantSlug::parse("acme").expect("slug");
        warehouse.prepare_tenant(&tenant).await.expect("migrate");
        let pool = warehouse.pool(&tenant, false).await.expect("pool");
        for entity in Entity::ALL {
            let mut stored: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
                    .bind(entity.name())
                    .fetch_all(&pool)
                    .await
                    .expect("columns");
            let mut expected: Vec<String> = entity
                .table_columns()
                .iter()
                .map(|c| c.to_string())
                .collect();
            stored.sort();
            expected.sort();
            assert_eq!(stored, expected, "table {entity}");
        }
    }
}
