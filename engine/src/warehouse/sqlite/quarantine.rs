//! Quarantined rows: reads, an admin's fix or ignore (audited by the caller), and the
//! settling of a replay in one transaction.

use super::load::add_to_ledger;
use super::{SqliteWarehouse, now_text};
use crate::error::{EngineError, ErrorKind, Result};
use crate::ledger::RowCounts;
use crate::quarantine::{
    QuarantineFilter, QuarantineStats, QuarantineStatus, QuarantinedRow, raw_text_and_hash,
};
use crate::tenant::TenantSlug;
use crate::validate::CellError;
use crate::warehouse::QuarantineStore;
use crate::warehouse::rows::quarantined_from_row;
use serde_json::Value;
use sqlx::{Sqlite, Transaction};

impl QuarantineStore for SqliteWarehouse {
    async fn quarantined(
        &self,
        tenant: &TenantSlug,
        filter: &QuarantineFilter,
    ) -> Result<Vec<QuarantinedRow>> {
        let pool = self.pool(tenant, false).await?;
        let rows = sqlx::query(
            "SELECT * FROM quarantine WHERE (?1 IS NULL OR run_id = ?1) AND (?2 IS NULL OR status = ?2) \
             AND (?3 IS NULL OR EXISTS (SELECT 1 FROM json_each(errors) WHERE json_extract(value, '$.rule') = ?3)) \
             AND (?5 IS NULL OR pipeline = ?5) AND (?6 IS NULL OR entity = ?6) \
             AND (?7 IS NULL OR EXISTS (SELECT 1 FROM json_each(errors) WHERE json_extract(value, '$.field') = ?7)) \
             AND (?8 IS NULL OR rowid > (SELECT rowid FROM quarantine WHERE id = ?8)) \
             ORDER BY rowid LIMIT ?4",
        )
        .bind(&filter.run_id)
        .bind(filter.status.map(QuarantineStatus::as_str))
        .bind(&filter.rule)
        .bind(i64::from(filter.limit.unwrap_or(100)))
        .bind(&filter.pipeline)
        .bind(&filter.entity)
        .bind(&filter.field)
        .bind(&filter.after)
        .fetch_all(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("listing quarantine", e))?;
        rows.iter()
            .map(|r| quarantined_from_row(tenant, r))
            .collect()
    }

    async fn quarantined_row(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<QuarantinedRow>> {
        let pool = self.pool(tenant, false).await?;
        let row = sqlx::query("SELECT * FROM quarantine WHERE id = ?")
            .bind(id)
            .fetch_optional(&pool)
            .await
            .map_err(|e| EngineError::from_sqlx("reading quarantine", e))?;
        row.map(|r| quarantined_from_row(tenant, &r)).transpose()
    }

    async fn fix_quarantined(
        &self,
        tenant: &TenantSlug,
        id: &str,
        raw: &serde_json::Map<String, Value>,
    ) -> Result<Option<QuarantinedRow>> {
        let pool = self.pool(tenant, false).await?;
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| EngineError::from_sqlx("starting a quarantine fix", e))?;
        let Some(before) = open_quarantined(&mut tx, tenant, id).await? else {
            return Ok(None);
        };
        let (text, hash) = raw_text_and_hash(raw);
        sqlx::query("UPDATE quarantine SET raw = ?, raw_hash = ?, status = 'fixed' WHERE id = ?")
            .bind(&text)
            .bind(&hash)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| same_values_error(e, "fixing a quarantined row"))?;
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the fix", e))?;
        Ok(Some(before))
    }

    async fn ignore_quarantined(
        &self,
        tenant: &TenantSlug,
        id: &str,
        reason: &str,
    ) -> Result<Option<QuarantinedRow>> {
        let pool = self.pool(tenant, false).await?;
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| EngineError::from_sqlx("starting to ignore a row", e))?;
        let Some(before) = open_quarantined(&mut tx, tenant, id).await? else {
            return Ok(None);
        };
        sqlx::query("UPDATE quarantine SET status = 'ignored', ignore_reason = ? WHERE id = ?")
            .bind(reason)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| EngineError::from_sqlx("ignoring a quarantined row", e))?;
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the ignore", e))?;
        Ok(Some(before))
    }

    async fn quarantine_stats(&self, tenant: &TenantSlug) -> Result<QuarantineStats> {
        let pool = self.pool(tenant, false).await?;
        let counts = |sql: &'static str| {
            let pool = pool.clone();
            async move {
                let rows: Vec<(Option<String>, i64)> =
                    sqlx::query_as(sql)
                        .fetch_all(&pool)
                        .await
                        .map_err(|e| EngineError::from_sqlx("counting quarantine", e))?;
                Ok::<_, EngineError>(
                    rows.into_iter()
                        .map(|(k, n)| (k.unwrap_or_default(), n as u64))
                        .collect(),
                )
            }
        };
        Ok(QuarantineStats {
            by_rule: counts(
                "SELECT json_extract(e.value, '$.rule'), COUNT(DISTINCT q.id) FROM quarantine q, json_each(q.errors) e GROUP BY 1",
            )
            .await?,
            by_field: counts(
                "SELECT json_extract(e.value, '$.field'), COUNT(DISTINCT q.id) FROM quarantine q, json_each(q.errors) e GROUP BY 1",
            )
            .await?,
            by_status: counts("SELECT status, COUNT(*) FROM quarantine GROUP BY status").await?,
            open_by_pipeline: counts(
                "SELECT pipeline, COUNT(*) FROM quarantine WHERE status IN ('pending', 'fixed') GROUP BY pipeline",
            )
            .await?,
            open_by_rule: counts(
                "SELECT json_extract(e.value, '$.rule'), COUNT(DISTINCT q.id) FROM quarantine q, json_each(q.errors) e \
                 WHERE q.status IN ('pending', 'fixed') GROUP BY 1",
            )
            .await?,
        })
    }

    async fn run_rule_counts(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        let pool = self.pool(tenant, false).await?;
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT json_extract(e.value, '$.rule'), COUNT(*) FROM quarantine q, json_each(q.errors) e WHERE q.run_id = ? GROUP BY 1",
        )
        .bind(run_id)
        .fetch_all(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("counting the run's quarantine", e))?;
        Ok(rows
            .into_iter()
            .map(|(k, n)| (k.unwrap_or_default(), n as u64))
            .collect())
    }

    async fn settle_replay(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
        replayed: &[String],
        failed: &[(String, Vec<CellError>)],
    ) -> Result<()> {
        let pool = self.pool(tenant, false).await?;
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| EngineError::from_sqlx("starting to settle the replay", e))?;
        settle_in(&mut tx, run_id, replayed, failed).await?;
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the replay's quarantine", e))
    }
}

/// A pending or fixed quarantined row, read inside a write transaction.
pub(super) async fn open_quarantined(
    tx: &mut Transaction<'static, Sqlite>,
    tenant: &TenantSlug,
    id: &str,
) -> Result<Option<QuarantinedRow>> {
    let row =
        sqlx::query("SELECT * FROM quarantine WHERE id = ? AND status IN ('pending', 'fixed')")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| EngineError::from_sqlx("reading quarantine", e))?;
    row.map(|r| quarantined_from_row(tenant, &r)).transpose()
}

/// Two open quarantine rows of a pipeline may not hold the same values.
pub(super) fn same_values_error(e: sqlx::Error, context: &str) -> EngineError {
    if e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
    {
        EngineError::new(
            ErrorKind::Input,
            "another open quarantined row of this pipeline already has exactly these values",
        )
    } else {
        EngineError::from_sqlx(context.to_string(), e)
    }
}

/// Settles a replay's quarantined rows inside `tx` (see
/// [`QuarantineStore::settle_replay`]); a replay batch does it in its own commit.
pub(super) async fn settle_in(
    tx: &mut Transaction<'static, Sqlite>,
    run_id: &str,
    replayed: &[String],
    failed: &[(String, Vec<CellError>)],
) -> Result<()> {
    let now = now_text();
    for id in replayed {
        sqlx::query(
            "UPDATE quarantine SET status = 'replayed', replay_run = ?, replayed_at = ? \
             WHERE id = ? AND status IN ('pending', 'fixed')",
        )
        .bind(run_id)
        .bind(&now)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(|e| EngineError::from_sqlx("marking a quarantined row replayed", e))?;
    }
    for (id, errors) in failed {
        sqlx::query(
            "UPDATE quarantine SET status = 'pending', errors = ? WHERE id = ? AND status IN ('pending', 'fixed')",
        )
        .bind(serde_json::to_string(errors).unwrap_or_else(|_| "[]".into()))
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(|e| EngineError::from_sqlx("recording a replayed row's errors", e))?;
    }
    let n = failed.len() as u64;
    add_to_ledger(
        tx,
        run_id,
        &RowCounts {
            rows_read: n,
            quarantined: n,
            ..RowCounts::default()
        },
    )
    .await?;
    Ok(())
}
