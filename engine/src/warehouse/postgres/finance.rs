//! Finance reads: sums per currency from the tables or the rollups, anomaly documents and
//! the saved anomaly counts per finance data version.

use super::rows::{get, normalize};
use super::{PostgresWarehouse, db, table};
use crate::entity::{Bill, Invoice, Payment};
use crate::error::{EngineError, ErrorKind, Result};
use crate::finance_rules::{
    AgingBuckets, AgingReport, AgingSide, AgingTotal, AnomalyDocument, FlowTotal, ProfitTotal,
};
use crate::finance_rules::{
    LIVE_DOCUMENT_SQL, aging_bucket_sql, anomaly_documents_sql, signed_sql,
};
use crate::money::display_decimal;
use crate::tenant::TenantSlug;
use crate::warehouse::{AgingRow, DocumentRow, decode_counts, encode_counts};
use crate::warehouse::{FinanceStore, LoadStore};
use chrono::NaiveDate;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgRow;
use std::collections::BTreeMap;

impl PostgresWarehouse {
    /// Every row of an entity table that the source has not deleted, in key order.
    async fn live_rows(
        &self,
        tenant: &TenantSlug,
        entity_table: &str,
        only: Option<&str>,
    ) -> Result<Vec<PgRow>> {
        self.prepare_tenant(tenant).await?;
        sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE deleted_at IS NULL AND ($1::text IS NULL OR external_id = $1) ORDER BY source, external_id",
            table(tenant, entity_table)
        )))
        .bind(only)
        .fetch_all(&self.pool)
        .await
        .map_err(db(format!("reading {entity_table}")))
    }
}

impl FinanceStore for PostgresWarehouse {
    async fn cash_flow_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<FlowTotal>> {
        self.prepare_tenant(tenant).await?;
        let rows: Vec<(String, String, String, String, i64)> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT currency, direction, to_char(day, 'YYYY-MM'), \
                    (SUM(amount) * 10000)::numeric(38, 0)::text, SUM(n)::int8 FROM {} \
             WHERE day BETWEEN $1 AND $2 GROUP BY 1, 2, 3 ORDER BY 1, 3, 2",
                table(tenant, "fin_flow")
            )))
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await
            .map_err(db("summing payments"))?;
        rows.into_iter()
            .map(|(currency, direction, month, units, n)| {
                Ok(FlowTotal {
                    currency,
                    direction,
                    month,
                    amount_units: units.parse().map_err(|_| {
                        EngineError::new(
                            ErrorKind::Warehouse,
                            format!("a payment sum is {units:?}"),
                        )
                    })?,
                    payments: n as u64,
                })
            })
            .collect()
    }

    async fn profit_totals(
        &self,
        tenant: &TenantSlug,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<ProfitTotal>> {
        self.prepare_tenant(tenant).await?;
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT currency, to_char(day, 'YYYY-MM'), line, (SUM(amount) * 10000)::numeric(38, 0)::text \
             FROM {} WHERE day BETWEEN $1 AND $2 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            table(tenant, "fin_profit"),
        )))
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(db("summing documents"))?;
        rows.into_iter()
            .map(|(currency, month, line, units)| {
                Ok(ProfitTotal {
                    currency,
                    month,
                    line,
                    amount_units: units.parse().map_err(|_| {
                        EngineError::new(
                            ErrorKind::Warehouse,
                            format!("a document sum is {units:?}"),
                        )
                    })?,
                })
            })
            .collect()
    }

    async fn aging_totals(
        &self,
        tenant: &TenantSlug,
        side: AgingSide,
        as_of: NaiveDate,
    ) -> Result<Vec<AgingTotal>> {
        let aging_bucket = aging_bucket_sql();
        let signed_balance = signed_sql("balance");
        self.prepare_tenant(tenant).await?;
        let (source, who) = match side {
            AgingSide::Receivable => (table(tenant, "invoices"), "customer"),
            AgingSide::Payable => (table(tenant, "bills"), "vendor"),
        };
        let rows: Vec<AgingRow<String>> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT currency, id, MAX(name), \
                   {aging_bucket} AS bucket, \
                   (SUM({signed_balance}) * 10000)::numeric(38, 0)::text \
                 FROM (SELECT currency, kind, balance, {who}_id AS id, {who}_name AS name, ($1::date - due_date) AS d \
                       FROM {source} WHERE balance > 0 AND {LIVE_DOCUMENT_SQL} AND due_date IS NOT NULL) q \
                 GROUP BY currency, id, bucket ORDER BY currency, id, bucket"
            )))
            .bind(as_of)
            .fetch_all(&self.pool)
            .await
            .map_err(db("computing aging"))?;
        rows.into_iter()
            .map(|(currency, id, name, bucket, units)| {
                Ok(AgingTotal {
                    currency,
                    counterparty_id: id,
                    counterparty_name: name,
                    bucket,
                    amount_units: units.parse().map_err(|_| {
                        EngineError::new(
                            ErrorKind::Warehouse,
                            format!("an open balance is {units:?}"),
                        )
                    })?,
                })
            })
            .collect()
    }

    async fn aging(
        &self,
        tenant: &TenantSlug,
        side: AgingSide,
        as_of: NaiveDate,
    ) -> Result<AgingReport> {
        let aging_bucket = aging_bucket_sql();
        self.prepare_tenant(tenant).await?;
        let side = match side {
            AgingSide::Receivable => "invoice",
            AgingSide::Payable => "bill",
        };
        let rows: Vec<(String, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT currency, {aging_bucket} AS bucket, (SUM(amount) * 10000)::numeric(38, 0)::text \
             FROM (SELECT currency, amount, ($2::date - due) AS d FROM {} WHERE side = $1) q \
             GROUP BY 1, 2 ORDER BY 1, 2",
            table(tenant, "fin_open")
        )))
        .bind(side)
        .bind(as_of)
        .fetch_all(&self.pool)
        .await
        .map_err(db("computing aging"))?;
        let mut report = AgingReport {
            as_of,
            currencies: Default::default(),
        };
        for (currency, bucket, units) in rows {
            let units: i128 = units.parse().map_err(|_| {
                EngineError::new(
                    ErrorKind::Warehouse,
                    format!("an open balance is {units:?}"),
                )
            })?;
            report
                .currencies
                .entry(currency)
                .or_insert_with(AgingBuckets::zero)
                .add(&bucket, display_decimal(units));
        }
        Ok(report)
    }

    async fn anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
    ) -> Result<(i64, Option<BTreeMap<String, u64>>)> {
        self.prepare_tenant(tenant).await?;
        let (version, counts): (i64, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT s.version, a.counts::text FROM {} s \
             LEFT JOIN {} a ON a.options = $1 AND a.version = s.version",
            table(tenant, "fin_state"),
            table(tenant, "fin_anomaly_snapshots")
        )))
        .bind(options)
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading saved anomaly counts"))?;
        Ok((version, decode_counts(counts)?))
    }

    async fn save_anomaly_counts(
        &self,
        tenant: &TenantSlug,
        options: &str,
        version: i64,
        counts: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let counts = encode_counts(counts)?;
        sqlx::query(AssertSqlSafe(format!(
            "WITH stale AS (DELETE FROM {snapshots} WHERE version < $2 AND options <> $1) \
             INSERT INTO {snapshots} AS a (options, version, counts, computed_at) \
             VALUES ($1, $2, $3::jsonb, now()) \
             ON CONFLICT (options) DO UPDATE SET version = EXCLUDED.version, counts = EXCLUDED.counts, \
               computed_at = EXCLUDED.computed_at WHERE a.version <= EXCLUDED.version",
            snapshots = table(tenant, "fin_anomaly_snapshots")
        )))
        .bind(options)
        .bind(version)
        .bind(counts)
        .execute(&self.pool)
        .await
        .map_err(db("saving anomaly counts"))?;
        Ok(())
    }

    async fn anomaly_documents(&self, tenant: &TenantSlug) -> Result<Vec<AnomalyDocument>> {
        self.prepare_tenant(tenant).await?;
        let rows: Vec<DocumentRow<String, NaiveDate>> =
            sqlx::query_as(AssertSqlSafe(anomaly_documents_sql(
                &table(tenant, "invoices"),
                &table(tenant, "bills"),
                "(total * 10000)::numeric(38, 0)::text",
            )))
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading documents"))?;
        rows.into_iter()
            .map(
                |(side, external_id, doc_number, counterparty_id, currency, units, issue_date)| {
                    Ok(AnomalyDocument {
                        side,
                        external_id,
                        doc_number,
                        counterparty_id,
                        currency,
                        total_units: units.parse().map_err(|_| {
                            EngineError::new(ErrorKind::Warehouse, format!("a total is {units:?}"))
                        })?,
                        issue_date,
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
                    issue_date: get(r, "issue_date")?,
                    due_date: get(r, "due_date")?,
                    currency: get(r, "currency")?,
                    total: normalize(get(r, "total")?)?,
                    balance: normalize(get(r, "balance")?)?,
                    status: get(r, "status")?,
                    kind: get(r, "kind")?,
                    updated_at: get(r, "updated_at")?,
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
                    issue_date: get(r, "issue_date")?,
                    due_date: get(r, "due_date")?,
                    currency: get(r, "currency")?,
                    total: normalize(get(r, "total")?)?,
                    balance: normalize(get(r, "balance")?)?,
                    status: get(r, "status")?,
                    kind: get(r, "kind")?,
                    category: get(r, "category")?,
                    updated_at: get(r, "updated_at")?,
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
                let applied: Option<sqlx::types::Json<Vec<String>>> = get(r, "applied_to")?;
                Ok(Payment {
                    external_id: get(r, "external_id")?,
                    direction: get(r, "direction")?,
                    counterparty_id: get(r, "counterparty_id")?,
                    date: get(r, "date")?,
                    amount: normalize(get(r, "amount")?)?,
                    currency: get(r, "currency")?,
                    applied_to: applied.map(|a| a.0).unwrap_or_default(),
                    updated_at: get(r, "updated_at")?,
                })
            })
            .collect()
    }
}
