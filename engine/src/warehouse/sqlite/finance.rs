//! Finance reads: the embedded warehouse keeps no rollups and sums its tables; anomaly
//! counts are saved per finance data version.

use super::rows::{date_col, get, money_col};
use super::{SqliteWarehouse, now_text};
use crate::entity::{Bill, Invoice, Payment};
use crate::error::{EngineError, ErrorKind, Result};
use crate::finance_rules::{AgingSide, AgingTotal, AnomalyDocument, FlowTotal, ProfitTotal};
use crate::finance_rules::{
    LIVE_DOCUMENT_SQL, aging_bucket_sql, anomaly_documents_sql, signed_sql,
};
use crate::tenant::TenantSlug;
use crate::warehouse::FinanceStore;
use crate::warehouse::rows::StoredRow;
use crate::warehouse::sql::quote_ident;
use crate::warehouse::{AgingRow, DocumentRow, decode_counts, encode_counts};
use chrono::NaiveDate;
use sqlx::AssertSqlSafe;
use sqlx::sqlite::SqliteRow;
use std::collections::BTreeMap;
use std::str::FromStr;

impl FinanceStore for SqliteWarehouse {
    async fn cash_flow_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<FlowTotal>> {
        let pool = self.pool(tenant, false).await?;
        let rows: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT currency, direction, substr(\"date\", 1, 7), SUM(amount), COUNT(*) FROM payments \
             WHERE deleted_at IS NULL AND \"date\" BETWEEN ?1 AND ?2 GROUP BY 1, 2, 3 ORDER BY 1, 3, 2",
        )
        .bind(from.format("%Y-%m-%d").to_string())
        .bind(to.format("%Y-%m-%d").to_string())
        .fetch_all(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("summing payments", e))?;
        Ok(rows
            .into_iter()
            .map(|(currency, direction, month, units, n)| FlowTotal {
                currency,
                direction,
                month,
                amount_units: i128::from(units),
                payments: n as u64,
            })
            .collect())
    }

    async fn profit_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<ProfitTotal>> {
        let pool = self.pool(tenant, false).await?;
        let signed = format!("SUM({})", signed_sql("total"));
        let live = format!("{LIVE_DOCUMENT_SQL} AND issue_date BETWEEN ?1 AND ?2");
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT currency, substr(issue_date, 1, 7), 'revenue', {signed} FROM invoices WHERE {live} GROUP BY 1, 2 \
             UNION ALL \
             SELECT currency, substr(issue_date, 1, 7), category, {signed} FROM bills WHERE {live} GROUP BY 1, 2, 3 \
             ORDER BY 1, 2, 3"
        )))
        .bind(from.format("%Y-%m-%d").to_string())
        .bind(to.format("%Y-%m-%d").to_string())
        .fetch_all(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("summing documents", e))?;
        Ok(rows
            .into_iter()
            .map(|(currency, month, line, units)| ProfitTotal {
                currency,
                month,
                line,
                amount_units: i128::from(units),
            })
            .collect())
    }

    async fn aging_totals(
        &self,
        tenant: &TenantSlug,
        side: AgingSide,
        as_of: NaiveDate,
    ) -> Result<Vec<AgingTotal>> {
        let aging_bucket = aging_bucket_sql();
        let signed_balance = signed_sql("balance");
        let pool = self.pool(tenant, false).await?;
        let (table, who) = match side {
            AgingSide::Receivable => ("invoices", "customer"),
            AgingSide::Payable => ("bills", "vendor"),
        };
        let rows: Vec<AgingRow<i64>> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT currency, id, MAX(name), \
                   {aging_bucket} AS bucket, \
                   SUM({signed_balance}) \
                 FROM (SELECT currency, kind, balance, {who}_id AS id, {who}_name AS name, \
                         CAST(julianday(?1) - julianday(due_date) AS INTEGER) AS d \
                       FROM {table} WHERE balance > 0 AND {LIVE_DOCUMENT_SQL} AND due_date IS NOT NULL) \
                 GROUP BY currency, id, bucket ORDER BY currency, id, bucket"
            )))
            .bind(as_of.format("%Y-%m-%d").to_string())
            .fetch_all(&pool)
            .await
            .map_err(|e| EngineError::from_sqlx("computing aging", e))?;
        Ok(rows
            .into_iter()
            .map(|(currency, id, name, bucket, units)| AgingTotal {
                currency,
                counterparty_id: id,
                counterparty_name: name,
                bucket,
                amount_units: i128::from(units),
            })
            .collect())
    }

    async fn anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
    ) -> Result<(i64, Option<BTreeMap<String, u64>>)> {
        let pool = self.pool(tenant, false).await?;
        let (version, counts): (i64, Option<String>) = sqlx::query_as(
            "SELECT s.version, a.counts FROM fin_state s \
             LEFT JOIN fin_anomaly_snapshots a ON a.options = ?1 AND a.version = s.version",
        )
        .bind(options)
        .fetch_one(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("reading saved anomaly counts", e))?;
        Ok((version, decode_counts(counts)?))
    }

    async fn save_anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
        version: i64,
        counts: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let pool = self.pool(tenant, false).await?;
        let counts = encode_counts(counts)?;
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| EngineError::from_sqlx("saving anomaly counts", e))?;
        sqlx::query("DELETE FROM fin_anomaly_snapshots WHERE version < ?2 AND options <> ?1")
            .bind(options)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(|e| EngineError::from_sqlx("saving anomaly counts", e))?;
        sqlx::query(
            "INSERT INTO fin_anomaly_snapshots (options, version, counts, computed_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (options) DO UPDATE SET version = excluded.version, counts = excluded.counts, \
               computed_at = excluded.computed_at WHERE fin_anomaly_snapshots.version <= excluded.version",
        )
        .bind(options)
        .bind(version)
        .bind(counts)
        .bind(now_text())
        .execute(&mut *tx)
        .await
        .map_err(|e| EngineError::from_sqlx("saving anomaly counts", e))?;
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("saving anomaly counts", e))
    }

    async fn anomaly_documents(&self, tenant: &TenantSlug) -> Result<Vec<AnomalyDocument>> {
        let pool = self.pool(tenant, false).await?;
        let rows: Vec<DocumentRow<i64, String>> = sqlx::query_as(AssertSqlSafe(
            anomaly_documents_sql("invoices", "bills", "total"),
        ))
        .fetch_all(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("reading documents", e))?;
        rows.into_iter()
            .map(
                |(side, external_id, doc_number, counterparty_id, currency, units, day)| {
                    Ok(AnomalyDocument {
                        side,
                        external_id,
                        doc_number,
                        counterparty_id,
                        currency,
                        total_units: i128::from(units),
                        issue_date: NaiveDate::from_str(&day).map_err(|e| {
                            EngineError::new(
                                ErrorKind::Warehouse,
                                format!("issue_date holds {day:?}"),
                            )
                            .with_source(e)
                        })?,
                    })
                },
            )
            .collect()
    }

    async fn invoices_matching(
        &self,
        tenant: &TenantSlug,
        only: Option<&str>,
    ) -> Result<Vec<Invoice>> {
        let rows = self.live_rows(tenant, "invoices", only).await?;
        rows.iter()
            .map(|r| {
                Ok(Invoice {
                    external_id: get(r, "external_id")?,
                    doc_number: get(r, "doc_number")?,
                    customer_id: get(r, "customer_id")?,
                    customer_name: get(r, "customer_name")?,
                    issue_date: date_col(r, "issue_date")?,
                    due_date: date_col(r, "due_date")?,
                    currency: get(r, "currency")?,
                    total: money_col(r, "total")?,
                    balance: money_col(r, "balance")?,
                    status: get(r, "status")?,
                    kind: get(r, "kind")?,
                    updated_at: r.instant("updated_at")?,
                })
            })
            .collect()
    }

    async fn bills_matching(&self, tenant: &TenantSlug, only: Option<&str>) -> Result<Vec<Bill>> {
        let rows = self.live_rows(tenant, "bills", only).await?;
        rows.iter()
            .map(|r| {
                Ok(Bill {
                    external_id: get(r, "external_id")?,
                    doc_number: get(r, "doc_number")?,
                    vendor_id: get(r, "vendor_id")?,
                    vendor_name: get(r, "vendor_name")?,
                    issue_date: date_col(r, "issue_date")?,
                    due_date: date_col(r, "due_date")?,
                    currency: get(r, "currency")?,
                    total: money_col(r, "total")?,
                    balance: money_col(r, "balance")?,
                    status: get(r, "status")?,
                    kind: get(r, "kind")?,
                    category: get(r, "category")?,
                    updated_at: r.instant("updated_at")?,
                })
            })
            .collect()
    }

    async fn payments_matching(
        &self,
        tenant: &TenantSlug,
        only: Option<&str>,
    ) -> Result<Vec<Payment>> {
        let rows = self.live_rows(tenant, "payments", only).await?;
        rows.iter()
            .map(|r| {
                let applied: Option<String> = get(r, "applied_to")?;
                Ok(Payment {
                    external_id: get(r, "external_id")?,
                    direction: get(r, "direction")?,
                    counterparty_id: get(r, "counterparty_id")?,
                    date: date_col(r, "date")?,
                    amount: money_col(r, "amount")?,
                    currency: get(r, "currency")?,
                    applied_to: match applied {
                        Some(text) => serde_json::from_str(&text).map_err(|e| {
                            EngineError::new(ErrorKind::Warehouse, "applied_to is not a JSON list")
                                .with_source(e)
                        })?,
                        None => Vec::new(),
                    },
                    updated_at: r.instant("updated_at")?,
                })
            })
            .collect()
    }
}

impl SqliteWarehouse {
    /// Every row of an entity table that the source has not deleted, in key order.
    async fn live_rows(
        &self,
        tenant: &TenantSlug,
        table: &str,
        only: Option<&str>,
    ) -> Result<Vec<SqliteRow>> {
        let pool = self.pool(tenant, false).await?;
        sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE deleted_at IS NULL AND (?1 IS NULL OR external_id = ?1) ORDER BY source, external_id",
            quote_ident(table)
        )))
        .bind(only)
        .fetch_all(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx(format!("reading {table}"), e))
    }
}
