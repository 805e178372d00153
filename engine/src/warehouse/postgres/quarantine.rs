//! Quarantined rows: reads, an admin's fix or ignore (audited by the caller), and the
//! settling of a replay in one transaction.

use super::{PostgresWarehouse, db, is_unique_violation, table};
use crate::error::{EngineError, ErrorKind, Result};
use crate::quarantine::{
    QuarantineFilter, QuarantineStats, QuarantineStatus, QuarantinedRow, raw_text_and_hash,
};
use crate::tenant::TenantSlug;
use crate::validate::CellError;
use crate::warehouse::rows::quarantined_from_row;
use crate::warehouse::{LoadStore, QuarantineStore};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Postgres, Transaction};

impl PostgresWarehouse {
    /// A pending or fixed quarantined row, locked for the transaction.
    async fn open_quarantined(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<QuarantinedRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE id = $1 AND status IN ('pending', 'fixed') FOR UPDATE",
            table(tenant, "quarantine")
        )))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db("reading quarantine"))?;
        row.map(|r| quarantined_from_row(tenant, &r)).transpose()
    }
}

impl QuarantineStore for PostgresWarehouse {
    async fn quarantined(
        &self,
        tenant: &TenantSlug,
        filter: &QuarantineFilter,
    ) -> Result<Vec<QuarantinedRow>> {
        self.prepare_tenant(tenant).await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {0} WHERE ($1::text IS NULL OR run_id = $1) AND ($2::text IS NULL OR status = $2) \
             AND ($3::text IS NULL OR errors @> jsonb_build_array(jsonb_build_object('rule', $3::text))) \
             AND ($5::text IS NULL OR pipeline = $5) AND ($6::text IS NULL OR entity = $6) \
             AND ($7::text IS NULL OR errors @> jsonb_build_array(jsonb_build_object('field', $7::text))) \
             AND ($8::text IS NULL OR seq > (SELECT seq FROM {0} WHERE id = $8)) \
             ORDER BY seq LIMIT $4",
            table(tenant, "quarantine")
        )))
        .bind(&filter.run_id)
        .bind(filter.status.map(QuarantineStatus::as_str))
        .bind(&filter.rule)
        .bind(i64::from(filter.limit.unwrap_or(100)))
        .bind(&filter.pipeline)
        .bind(&filter.entity)
        .bind(&filter.field)
        .bind(&filter.after)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing quarantine"))?;
        rows.iter()
            .map(|r| quarantined_from_row(tenant, r))
            .collect()
    }

    async fn quarantined_row(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> Result<Option<QuarantinedRow>> {
        self.prepare_tenant(tenant).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE id = $1",
            table(tenant, "quarantine")
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading quarantine"))?;
        row.map(|r| quarantined_from_row(tenant, &r)).transpose()
    }

    async fn fix_quarantined(
        &self,
        tenant: &TenantSlug,
        id: &str,
        raw: &serde_json::Map<String, Value>,
    ) -> Result<Option<QuarantinedRow>> {
        self.prepare_tenant(tenant).await?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting a quarantine fix"))?;
        let Some(before) = self.open_quarantined(&mut tx, tenant, id).await? else {
            return Ok(None);
        };
        let (text, hash) = raw_text_and_hash(raw);
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET raw = $1::jsonb, raw_text = $1, raw_hash = $2, status = 'fixed' WHERE id = $3",
            table(tenant, "quarantine")
        )))
        .bind(&text)
        .bind(&hash)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                EngineError::new(
                    ErrorKind::Input,
                    "another open quarantined row of this pipeline already has exactly these values",
                )
            } else {
                EngineError::from_sqlx("fixing a quarantined row", e)
            }
        })?;
        tx.commit().await.map_err(db("committing the fix"))?;
        Ok(Some(before))
    }

    async fn ignore_quarantined(
        &self,
        tenant: &TenantSlug,
        id: &str,
        reason: &str,
    ) -> Result<Option<QuarantinedRow>> {
        self.prepare_tenant(tenant).await?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to ignore a row"))?;
        let Some(before) = self.open_quarantined(&mut tx, tenant, id).await? else {
            return Ok(None);
        };
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET status = 'ignored', ignore_reason = $1 WHERE id = $2",
            table(tenant, "quarantine")
        )))
        .bind(reason)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db("ignoring a quarantined row"))?;
        tx.commit().await.map_err(db("committing the ignore"))?;
        Ok(Some(before))
    }

    async fn quarantine_stats(&self, tenant: &TenantSlug) -> Result<QuarantineStats> {
        self.prepare_tenant(tenant).await?;
        let q = table(tenant, "quarantine");
        let counts = |sql: String| async move {
            let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(&self.pool)
                .await
                .map_err(db("counting quarantine"))?;
            Ok::<_, EngineError>(
                rows.into_iter()
                    .map(|(k, n)| (k.unwrap_or_default(), n as u64))
                    .collect(),
            )
        };
        Ok(QuarantineStats {
            by_rule: counts(format!(
                "SELECT e->>'rule', COUNT(DISTINCT q.id) FROM {q} q, jsonb_array_elements(q.errors) e GROUP BY 1"
            ))
            .await?,
            by_field: counts(format!(
                "SELECT e->>'field', COUNT(DISTINCT q.id) FROM {q} q, jsonb_array_elements(q.errors) e GROUP BY 1"
            ))
            .await?,
            by_status: counts(format!("SELECT status, COUNT(*) FROM {q} GROUP BY status")).await?,
            open_by_pipeline: counts(format!(
                "SELECT pipeline, COUNT(*) FROM {q} WHERE status IN ('pending', 'fixed') GROUP BY pipeline"
            ))
            .await?,
            open_by_rule: counts(format!(
                "SELECT e->>'rule', COUNT(DISTINCT q.id) FROM {q} q, jsonb_array_elements(q.errors) e \
                 WHERE q.status IN ('pending', 'fixed') GROUP BY 1"
            ))
            .await?,
        })
    }

    async fn run_rule_counts(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        self.prepare_tenant(tenant).await?;
        let q = table(tenant, "quarantine");
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT e->>'rule', COUNT(*) FROM {q} q, jsonb_array_elements(q.errors) e WHERE q.run_id = $1 GROUP BY 1"
        )))
        .bind(run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting the run's quarantine"))?;
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
        self.prepare_tenant(tenant).await?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to settle the replay"))?;
        settle_in(&mut tx, tenant, run_id, replayed, failed).await?;
        let commit = self.commits.load(std::sync::atomic::Ordering::SeqCst);
        self.fire("before_commit", &mut tx, commit).await?;
        tx.commit()
            .await
            .map_err(db("committing the replay's quarantine"))
    }
}

/// Settles a replay's quarantined rows inside `tx` (see
/// [`QuarantineStore::settle_replay`]); a replay batch does it in its own commit.
pub(super) async fn settle_in(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantSlug,
    run_id: &str,
    replayed: &[String],
    failed: &[(String, Vec<CellError>)],
) -> Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET status = 'replayed', replay_run = $1, replayed_at = now() \
         WHERE id = ANY($2) AND status IN ('pending', 'fixed')",
        table(tenant, "quarantine")
    )))
    .bind(run_id)
    .bind(replayed)
    .execute(&mut **tx)
    .await
    .map_err(db("marking quarantined rows replayed"))?;
    let ids: Vec<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
    let errors: Vec<String> = failed
        .iter()
        .map(|(_, e)| serde_json::to_string(e).unwrap_or_else(|_| "[]".into()))
        .collect();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {0} AS q SET status = 'pending', errors = f.errors::jsonb \
         FROM UNNEST($1::text[], $2::text[]) AS f(id, errors) \
         WHERE q.id = f.id AND q.status IN ('pending', 'fixed')",
        table(tenant, "quarantine")
    )))
    .bind(&ids)
    .bind(&errors)
    .execute(&mut **tx)
    .await
    .map_err(db("recording replayed rows' errors"))?;
    let n = failed.len() as i64;
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET rows_read = rows_read + $1, quarantined = quarantined + $1 WHERE run_id = $2",
        table(tenant, "runs")
    )))
    .bind(n)
    .bind(run_id)
    .execute(&mut **tx)
    .await
    .map_err(db("updating the run ledger"))?;
    Ok(())
}
