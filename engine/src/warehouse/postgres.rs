//! The production warehouse: PostgreSQL, one schema per tenant (`tenant_<slug>`) plus the
//! control schema `sluice`. Every query is schema-qualified (nothing relies on
//! `search_path`) and every identifier is validated and quoted.
//!
//! A batch commit: compare-and-set the stream cursor (the fence), COPY the rows into a
//! temporary staging table, then one statement that classifies each staged row against the
//! stored one (insert / update / unchanged / same-run duplicate), upserts the winners and
//! marks the unchanged as read by this run; quarantined rows and ledger counts join the same
//! transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow_array::{Array, RecordBatch};
use chrono::{DateTime, NaiveDate, Utc};
use futures_util::future::BoxFuture;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};

use super::{
    AGING_BUCKET_SQL, AgingRow, BatchCommitted, DocumentRow, LoadBatch, RunScope, StreamState,
    Warehouse, anomaly_documents_sql, decode_counts, encode_counts, load_columns, quote_ident,
};
use crate::columns::{CanonicalColumn, canonical_columns};
use crate::control::{
    AccessStore, ApiKeyRecord, AuditEntry, PipelineStore, Role, ScheduledPipeline, StoredPipeline,
    decode_secrets, no_master_key, secrets_context,
};
use crate::dead_letter::DeadLetter;
use crate::entity::{Bill, Entity, FieldKind, Invoice, Payment};
use crate::error::{EngineError, ErrorKind, Result};
use crate::finance::{
    AgingBuckets, AgingReport, AgingSide, AgingTotal, AnomalyDocument, FlowTotal, ProfitTotal,
};
use crate::ledger::{RowCounts, RunLedger, RunStatus};
use crate::money::{MONEY_SCALE, display_decimal};
use crate::quarantine::{
    QuarantineFilter, QuarantineStats, QuarantineStatus, QuarantinedRow, SourcePosition,
    raw_text_and_hash,
};
use crate::secrets::{DataKey, MasterKey};
use crate::tenant::TenantSlug;
use crate::validate::{CellError, dates, money, strings};

const CONTROL_MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../../migrations/control/0001_control.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/control/0002_api_keys.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/control/0003_uploads.sql"),
    ),
];
const TENANT_MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../../migrations/tenant/postgres/0001_warehouse.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/tenant/postgres/0002_dead_letters.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/tenant/postgres/0003_quarantine_replay.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/tenant/postgres/0004_quarantine_ignore.sql"),
    ),
    (
        5,
        include_str!("../../../migrations/tenant/postgres/0005_finance_rollups.sql"),
    ),
];
/// Serialises migrators across processes (an arbitrary constant, "sluice" in ASCII).
const MIGRATION_LOCK: i64 = 0x736c_7569_6365;

/// A named point in the commit path where a test can inject a fault (kill the connection,
/// stall), in the spirit of the `fail` crate's failpoints.
#[derive(Debug, Clone, Copy)]
pub struct FaultPoint {
    /// `after_copy`: the batch's rows are staged, nothing is upserted yet.
    pub name: &'static str,
    /// The PostgreSQL backend running the batch's transaction.
    pub backend_pid: i32,
    /// 1-based count of batch commits this warehouse has started.
    pub commit: u64,
}

/// Called at every [`FaultPoint`].
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> BoxFuture<'static, ()> + Send + Sync>;

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

/// The PostgreSQL warehouse.
pub struct PostgresWarehouse {
    pool: PgPool,
    fault: Option<FaultHook>,
    commits: AtomicU64,
    master: Option<Arc<MasterKey>>,
}

fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> EngineError {
    let context = context.into();
    move |e| EngineError::from_sqlx(context, e)
}

fn schema_of(tenant: &TenantSlug) -> String {
    quote_ident(&format!("tenant_{tenant}"))
}

fn table(tenant: &TenantSlug, name: &str) -> String {
    format!("{}.{}", schema_of(tenant), quote_ident(name))
}

/// The finance rollups (kept by triggers, see migration 0005) and the key columns of each;
/// `fin_<name>_expected` computes the same sums from the tables.
const ROLLUPS: [(&str, &str); 3] = [
    ("fin_flow", "currency, direction, day"),
    ("fin_profit", "currency, day, line"),
    ("fin_open", "side, currency, due"),
];

/// A group whose rollup differs from the tables: its key, the kept sum and count, and the
/// tables' sum and count (none where the group is missing on that side).
type DriftRow = (
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

/// The advisory lock that serialises a tenant's writers of finance rows (taken by the
/// rollup triggers; the same key as `fin_begin` in migration 0005).
fn finance_lock_key(tenant: &TenantSlug) -> String {
    format!("sluice.finance.{}", schema_of(tenant))
}

impl PostgresWarehouse {
    /// Connects to `url` (e.g. `postgres://user@127.0.0.1:5432/sluice`). The password, if
    /// any, is never included in errors.
    pub async fn connect(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse().map_err(|_| {
            EngineError::new(
                ErrorKind::Config,
                "the database URL is not a valid postgres:// URL",
            )
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| EngineError::from_sqlx("connecting to PostgreSQL", e))?;
        Ok(PostgresWarehouse {
            pool,
            fault: None,
            commits: AtomicU64::new(0),
            master: None,
        })
    }

    /// Uses `master` to open tenants' data keys (needed to store or read pipeline secrets).
    pub fn with_master_key(mut self, master: MasterKey) -> Self {
        self.master = Some(Arc::new(master));
        self
    }

    /// Installs a fault hook (tests only).
    pub fn with_fault_hook(mut self, hook: FaultHook) -> Self {
        self.fault = Some(hook);
        self
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

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

    /// Compares the tenant's finance rollups with the sums of the tables they are kept
    /// from; one line per group that differs (none when they agree).
    pub async fn check_finance_rollups(&self, tenant: &TenantSlug) -> Result<Vec<String>> {
        self.prepare_tenant(tenant).await?;
        let mut drift = Vec::new();
        for (rollup, key) in ROLLUPS {
            // One statement: the rollup and the tables are read in one snapshot.
            let rows: Vec<DriftRow> =
                sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT COALESCE(k.key, e.key), k.amount::text, k.n, e.amount::text, e.n \
                     FROM (SELECT concat_ws('/', {key}) AS key, amount, n FROM {kept}) k \
                     FULL JOIN (SELECT concat_ws('/', {key}) AS key, amount, n FROM {expected}) e ON e.key = k.key \
                     WHERE k.key IS NULL OR e.key IS NULL OR k.amount <> e.amount OR k.n <> e.n \
                     ORDER BY 1",
                    kept = table(tenant, rollup),
                    expected = table(tenant, &format!("{rollup}_expected")),
                )))
                .fetch_all(&self.pool)
                .await
                .map_err(db(format!("checking {rollup}")))?;
            let show = |amount: Option<String>, n: Option<i64>| match (amount, n) {
                (Some(a), Some(n)) => format!("{a} over {n} rows"),
                _ => "nothing".to_string(),
            };
            drift.extend(rows.into_iter().map(|(group, ka, kn, ea, en)| {
                format!(
                    "{rollup} {group}: kept {}, the tables sum to {}",
                    show(ka, kn),
                    show(ea, en)
                )
            }));
        }
        Ok(drift)
    }

    /// Recomputes the tenant's finance rollups from the tables, in one transaction that
    /// holds the tenant's finance lock (no batch changes them meanwhile), and moves the
    /// finance data version on (saved anomaly counts are computed again).
    pub async fn rebuild_finance_rollups(&self, tenant: &TenantSlug) -> Result<()> {
        self.prepare_tenant(tenant).await?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the rebuild"))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(finance_lock_key(tenant))
            .execute(&mut *tx)
            .await
            .map_err(db("taking the finance lock"))?;
        for (rollup, _) in ROLLUPS {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DELETE FROM {kept}; INSERT INTO {kept} SELECT * FROM {expected}",
                kept = table(tenant, rollup),
                expected = table(tenant, &format!("{rollup}_expected")),
            )))
            .execute(&mut *tx)
            .await
            .map_err(db(format!("rebuilding {rollup}")))?;
        }
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET version = version + 1",
            table(tenant, "fin_state")
        )))
        .execute(&mut *tx)
        .await
        .map_err(db("moving the finance data version on"))?;
        tx.commit().await.map_err(db("committing the rebuild"))
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

    async fn data_key(&self, tenant: &TenantSlug) -> Result<DataKey> {
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        let wrapped: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT wrapped_key FROM sluice.tenants WHERE slug = $1")
                .bind(tenant.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| control_error("reading the tenant key", e))?;
        let wrapped = wrapped.ok_or_else(|| missing_tenant(tenant))?;
        master.unwrap_key(&wrapped, tenant.as_str())
    }

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

    /// Every row of an entity table that the source has not deleted, in key order.
    async fn live_rows(&self, tenant: &TenantSlug, entity_table: &str) -> Result<Vec<PgRow>> {
        self.prepare_tenant(tenant).await?;
        sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE deleted_at IS NULL ORDER BY source, external_id",
            table(tenant, entity_table)
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(db(format!("reading {entity_table}")))
    }

    async fn fire(
        &self,
        name: &'static str,
        tx: &mut Transaction<'static, Postgres>,
        commit: u64,
    ) -> Result<()> {
        if let Some(hook) = &self.fault {
            let backend_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut **tx)
                .await
                .map_err(db("fault point"))?;
            hook(FaultPoint {
                name,
                backend_pid,
                commit,
            })
            .await;
        }
        Ok(())
    }
}

fn latest_tenant_version() -> i32 {
    TENANT_MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

fn missing_tenant(tenant: &TenantSlug) -> EngineError {
    EngineError::new(
        ErrorKind::NotFound,
        format!("tenant '{tenant}' does not exist; create it with `sluice tenant create {tenant}`"),
    )
}

/// Reads of the control schema before `sluice migrate` ran fail with "undefined table".
fn control_error(context: &str, e: sqlx::Error) -> EngineError {
    if let sqlx::Error::Database(d) = &e
        && d.code().as_deref() == Some("42P01")
    {
        return EngineError::new(
            ErrorKind::Config,
            "the control schema is missing: run `sluice migrate` first",
        );
    }
    EngineError::from_sqlx(context.to_string(), e)
}

fn tenant_from_row(r: &PgRow) -> Result<TenantInfo> {
    Ok(TenantInfo {
        slug: r.try_get("slug").map_err(db("slug"))?,
        name: r.try_get("name").map_err(db("name"))?,
        schema: r.try_get("schema_name").map_err(db("schema_name"))?,
        schema_version: r.try_get("schema_version").map_err(db("schema_version"))?,
        created_at: r.try_get("created_at").map_err(db("created_at"))?,
    })
}

async fn audit(
    tx: &mut Transaction<'static, Postgres>,
    actor: &str,
    action: &str,
    tenant: Option<&str>,
    target: &str,
    detail: Value,
) -> Result<()> {
    sqlx::query("INSERT INTO sluice.audit_log (actor, action, tenant, target, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(actor)
        .bind(action)
        .bind(tenant)
        .bind(target)
        .bind(sqlx::types::Json(detail))
        .execute(&mut **tx)
        .await
        .map_err(db("writing the audit log"))?;
    Ok(())
}

/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// PostgreSQL's binary `numeric` for an amount in units of 1/10000: base-10000 digits, the
/// last of them the four decimals, so the value crosses the wire without any text parsing.
fn put_numeric(out: &mut Vec<u8>, units: i128) {
    let negative = units < 0;
    let abs = units.unsigned_abs();
    let mut int_digits: Vec<i16> = Vec::new();
    let mut int = abs / 10_000;
    while int > 0 {
        int_digits.push((int % 10_000) as i16);
        int /= 10_000;
    }
    int_digits.reverse();
    let weight = int_digits.len() as i16 - 1;
    let mut digits = int_digits;
    digits.push((abs % 10_000) as i16);
    while digits.last() == Some(&0) {
        digits.pop();
    }
    let (weight, sign) = if digits.is_empty() {
        (0, 0u16)
    } else {
        (weight, if negative { 0x4000 } else { 0 })
    };
    let len = 8 + 2 * digits.len();
    out.extend_from_slice(&(len as i32).to_be_bytes());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(MONEY_SCALE as u16).to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

fn put_instant(out: &mut Vec<u8>, micros: i64) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&(micros - PG_EPOCH_MICROS).to_be_bytes());
}

/// The selected rows (row index, fingerprint) in COPY binary format, in [`load_columns`]
/// order: no text for the server to parse.
fn copy_rows(
    entity: Entity,
    rows: &RecordBatch,
    deleted: &[Option<i64>],
    selection: &[(u32, u128)],
    source: &str,
    loaded_at_micros: i64,
    run_id: &str,
) -> Vec<u8> {
    let cols = canonical_columns(entity, rows);
    let width = (load_columns(entity).len()) as i16;
    let mut out = Vec::with_capacity(19 + selection.len() * 220);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for &(row, fingerprint) in selection {
        let row = row as usize;
        out.extend_from_slice(&width.to_be_bytes());
        put_bytes(&mut out, source.as_bytes());
        for (kind, col) in &cols {
            if !col.is_valid(row) {
                put_null(&mut out);
                continue;
            }
            match col {
                CanonicalColumn::Text(a) if *kind == FieldKind::IdList => {
                    let v = a.value(row).as_bytes();
                    out.extend_from_slice(&(v.len() as i32 + 1).to_be_bytes());
                    out.push(1); // jsonb binary format version
                    out.extend_from_slice(v);
                }
                CanonicalColumn::Text(a) => put_bytes(&mut out, a.value(row).as_bytes()),
                CanonicalColumn::Date(a) => {
                    out.extend_from_slice(&4i32.to_be_bytes());
                    out.extend_from_slice(&(a.value(row) - PG_EPOCH_DAYS).to_be_bytes());
                }
                CanonicalColumn::Instant(a) => put_instant(&mut out, a.value(row)),
                CanonicalColumn::Money(a) => put_numeric(&mut out, a.value(row)),
                CanonicalColumn::Flag(a) => {
                    out.extend_from_slice(&1i32.to_be_bytes());
                    out.push(u8::from(a.value(row)));
                }
            }
        }
        match deleted.get(row).copied().flatten() {
            Some(at) => put_instant(&mut out, at),
            None => put_null(&mut out),
        }
        put_instant(&mut out, loaded_at_micros);
        put_bytes(&mut out, run_id.as_bytes());
        put_bytes(&mut out, &fingerprint.to_le_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// A rollup group's sum (units of 1/10000) and row count.
type Sums = (i128, i64);

/// Rollup groups as bind arrays: the three key columns, the sums, the counts.
type GroupColumns<A, B, C> = (Vec<A>, Vec<B>, Vec<C>, Vec<Decimal>, Vec<i64>);

/// What rows inserted by a batch add to the finance rollups: the definitions of migration
/// 0005's `fin_*_expected` views, applied to the batch's own columns, so that a load's
/// inserts need no transition table (updates and deletions are kept by the triggers).
#[derive(Default)]
struct RollupDelta<'a> {
    /// (currency, direction, day) of live payments.
    flow: HashMap<(&'a str, &'a str, NaiveDate), Sums>,
    /// (currency, issue day, line) of live, non-void documents; credit notes negative.
    profit: HashMap<(&'a str, NaiveDate, &'a str), Sums>,
    /// (side, currency, due day) of open balances; credit notes negative.
    open: HashMap<(&'static str, &'a str, NaiveDate), Sums>,
}

impl<'a> RollupDelta<'a> {
    /// The sums of the `selection` rows; none for an entity the rollups do not cover or
    /// when no rows were inserted.
    fn of_inserts(
        entity: Entity,
        rows: &'a RecordBatch,
        deleted: &[Option<i64>],
        selection: &[(u32, u128)],
    ) -> Option<Self> {
        if selection.is_empty()
            || !matches!(entity, Entity::Payments | Entity::Invoices | Entity::Bills)
        {
            return None;
        }
        let mut delta = RollupDelta::default();
        // A date PostgreSQL holds is always in chrono's range.
        let day = |a: &arrow_array::Date32Array, row: usize| {
            a.is_valid(row)
                .then(|| crate::time::days_to_date(a.value(row)))
                .flatten()
        };
        let text =
            |a: &'a arrow_array::StringArray, row: usize| a.is_valid(row).then(|| a.value(row));
        let live = |row: usize| deleted.get(row).copied().flatten().is_none();
        let add = |sums: &mut Sums, units: i128| {
            sums.0 += units;
            sums.1 += 1;
        };
        match entity {
            Entity::Payments => {
                let (currency, direction) = (strings(rows, "currency"), strings(rows, "direction"));
                let (date, amount) = (dates(rows, "date"), money(rows, "amount"));
                for &(row, _) in selection {
                    let row = row as usize;
                    if !live(row) || !amount.is_valid(row) {
                        continue;
                    }
                    let (Some(c), Some(d), Some(on)) =
                        (text(currency, row), text(direction, row), day(date, row))
                    else {
                        continue;
                    };
                    let sums = delta.flow.entry((c, d, on)).or_default();
                    add(sums, amount.value(row));
                }
            }
            Entity::Invoices | Entity::Bills => {
                let side = if entity == Entity::Invoices {
                    "invoice"
                } else {
                    "bill"
                };
                let (currency, status, kind) = (
                    strings(rows, "currency"),
                    strings(rows, "status"),
                    strings(rows, "kind"),
                );
                let category = (entity == Entity::Bills).then(|| strings(rows, "category"));
                let (issue, due) = (dates(rows, "issue_date"), dates(rows, "due_date"));
                let (total, balance) = (money(rows, "total"), money(rows, "balance"));
                for &(row, _) in selection {
                    let row = row as usize;
                    let counts = live(row) && status.is_valid(row) && status.value(row) != "void";
                    let Some(c) = text(currency, row).filter(|_| counts) else {
                        continue;
                    };
                    let sign = if kind.is_valid(row) && kind.value(row) == "credit_note" {
                        -1
                    } else {
                        1
                    };
                    let line = match category {
                        None => Some("revenue"),
                        Some(a) => text(a, row),
                    };
                    if let (Some(line), Some(on), true) =
                        (line, day(issue, row), total.is_valid(row))
                    {
                        let key = (c, on, line);
                        add(
                            delta.profit.entry(key).or_default(),
                            sign * total.value(row),
                        );
                    }
                    if let (true, Some(on)) = (
                        balance.is_valid(row) && balance.value(row) > 0,
                        day(due, row),
                    ) {
                        let key = (side, c, on);
                        add(
                            delta.open.entry(key).or_default(),
                            sign * balance.value(row),
                        );
                    }
                }
            }
            _ => {}
        }
        Some(delta)
    }

    /// Adds the sums to the rollups, under the tenant's finance lock, and moves the finance
    /// data version on (inserted rows that add nothing, void or deleted ones, still do: the
    /// version stands for every change).
    async fn apply(
        self,
        tx: &mut Transaction<'static, Postgres>,
        tenant: &TenantSlug,
    ) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(finance_lock_key(tenant))
            .execute(&mut **tx)
            .await
            .map_err(db("taking the finance lock"))?;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET version = version + 1",
            table(tenant, "fin_state")
        )))
        .execute(&mut **tx)
        .await
        .map_err(db("moving the finance data version on"))?;
        add_groups(
            tx,
            tenant,
            "fin_flow",
            "currency, direction, day",
            "text, text, date",
            self.flow,
        )
        .await?;
        add_groups(
            tx,
            tenant,
            "fin_profit",
            "currency, day, line",
            "text, date, text",
            self.profit,
        )
        .await?;
        add_groups(
            tx,
            tenant,
            "fin_open",
            "side, currency, due",
            "text, text, date",
            self.open,
        )
        .await?;
        Ok(())
    }
}

/// Adds `groups` to `rollup` (key columns `key` of SQL types `types`): one upsert of
/// arrays, nothing when there are none.
async fn add_groups<A, B, C>(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantSlug,
    rollup: &str,
    key: &str,
    types: &str,
    groups: HashMap<(A, B, C), Sums>,
) -> Result<()>
where
    Vec<A>: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
    Vec<B>: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
    Vec<C>: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
{
    if groups.is_empty() {
        return Ok(());
    }
    let mut cols: GroupColumns<A, B, C> = Default::default();
    for ((a, b, c), (units, n)) in groups {
        cols.0.push(a);
        cols.1.push(b);
        cols.2.push(c);
        cols.3.push(display_decimal(units));
        cols.4.push(n);
    }
    let casts: Vec<String> = types
        .split(", ")
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", i + 1))
        .collect();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} AS f ({key}, amount, n) SELECT * FROM UNNEST({}, $4::numeric[], $5::int8[]) \
         ON CONFLICT ({key}) DO UPDATE SET amount = f.amount + EXCLUDED.amount, n = f.n + EXCLUDED.n",
        table(tenant, rollup),
        casts.join(", ")
    )))
    .bind(cols.0)
    .bind(cols.1)
    .bind(cols.2)
    .bind(cols.3)
    .bind(cols.4)
    .execute(&mut **tx)
    .await
    .map_err(db(format!("adding to {rollup}")))?;
    Ok(())
}

/// Classify staged rows against stored ones, upsert the winners, mark the unchanged as read
/// by this run, and count each fate. `$1` is the run id. The order of versions is the one
/// the SQLite warehouse applies: a missing `updated_at` sorts first; equal versions with
/// different content count as an update; rows already read by this same run are
/// duplicates, and the later one wins unless it is older.
fn classify_upsert_sql(tenant: &TenantSlug, entity: Entity) -> String {
    let target = table(tenant, entity.name());
    let stage = quote_ident(&format!("sluice_stage_{}", entity.name()));
    let cols: Vec<String> = load_columns(entity)
        .iter()
        .map(|c| quote_ident(c))
        .collect();
    let updates: Vec<String> = load_columns(entity)
        .iter()
        .filter(|c| !matches!(**c, "source" | "external_id"))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
        .collect();
    let cmp = "CASE WHEN s.updated_at IS NOT DISTINCT FROM t.updated_at THEN 0 \
                    WHEN s.updated_at IS NULL THEN -1 WHEN t.updated_at IS NULL THEN 1 \
                    WHEN s.updated_at > t.updated_at THEN 1 ELSE -1 END";
    format!(
        "WITH staged AS ( \
           SELECT s.*, CASE \
             WHEN t.external_id IS NULL THEN 'insert' \
             WHEN t.run_id = $1 THEN CASE WHEN ({cmp}) >= 0 THEN 'dup_write' ELSE 'dup_skip' END \
             WHEN ({cmp}) < 0 THEN 'unchanged' \
             WHEN ({cmp}) = 0 AND s.row_hash = t.row_hash THEN 'unchanged' \
             ELSE 'update' END AS fate \
           FROM pg_temp.{stage} s LEFT JOIN {target} t ON t.source = s.source AND t.external_id = s.external_id \
         ), written AS ( \
           INSERT INTO {target} ({cols}) SELECT {cols} FROM staged WHERE fate IN ('insert', 'update', 'dup_write') \
           ON CONFLICT (source, external_id) DO UPDATE SET {updates} RETURNING 1 \
         ), touched AS ( \
           UPDATE {target} t SET run_id = $1 FROM staged s \
           WHERE s.fate = 'unchanged' AND t.source = s.source AND t.external_id = s.external_id RETURNING 1 \
         ) SELECT fate, count(*) AS n FROM staged GROUP BY fate",
        cols = cols.join(", "),
        updates = updates.join(", ")
    )
}

/// Keeps the last of several identical bad records in one batch: one quarantine entry each.
fn distinct_quarantine(
    batch: &LoadBatch,
) -> Vec<(String, String, &crate::quarantine::QuarantineRecord)> {
    let mut by_hash: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(String, String, &crate::quarantine::QuarantineRecord)> = Vec::new();
    for record in &batch.quarantine {
        let raw = Value::Object(record.raw.clone()).to_string();
        let hash = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(raw.as_bytes()));
        match by_hash.get(&hash) {
            Some(&i) => out[i] = (raw, hash, record),
            None => {
                by_hash.insert(hash.clone(), out.len());
                out.push((raw, hash, record));
            }
        }
    }
    out
}

impl Warehouse for PostgresWarehouse {
    async fn prepare_tenant(&self, tenant: &TenantSlug) -> Result<()> {
        let version: Option<i32> =
            sqlx::query_scalar("SELECT schema_version FROM sluice.tenants WHERE slug = $1")
                .bind(tenant.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| control_error("reading the tenant", e))?;
        match version {
            None => Err(missing_tenant(tenant)),
            Some(v) if v < latest_tenant_version() => Err(EngineError::new(
                ErrorKind::Config,
                format!(
                    "tenant '{tenant}' is at schema version {v}, this build needs {}: run `sluice migrate`",
                    latest_tenant_version()
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    async fn tenants(&self) -> Result<Vec<TenantSlug>> {
        self.list_tenants()
            .await?
            .iter()
            .map(|t| TenantSlug::parse(&t.slug))
            .collect()
    }

    async fn stream_state(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        stream: &str,
    ) -> Result<StreamState> {
        sqlx::query("INSERT INTO sluice.stream_state (tenant, pipeline, stream) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(tenant.as_str())
            .bind(pipeline)
            .bind(stream)
            .execute(&self.pool)
            .await
            .map_err(db("creating stream state"))?;
        let row = sqlx::query("SELECT cursor, version FROM sluice.stream_state WHERE tenant = $1 AND pipeline = $2 AND stream = $3")
            .bind(tenant.as_str())
            .bind(pipeline)
            .bind(stream)
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading stream state"))?;
        let cursor: Option<sqlx::types::Json<Value>> =
            row.try_get("cursor").map_err(db("cursor"))?;
        Ok(StreamState {
            cursor: cursor.map(|c| c.0),
            version: row.try_get("version").map_err(db("version"))?,
        })
    }

    async fn begin_run(&self, ledger: &RunLedger) -> Result<()> {
        let tenant = TenantSlug::parse(&ledger.tenant)?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the run record"))?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (run_id, pipeline, entity, \"trigger\", started_at, status, rules_hash) VALUES ($1, $2, $3, $4, $5, 'running', $6)",
            table(&tenant, "runs")
        )))
        .bind(&ledger.run_id)
        .bind(&ledger.pipeline)
        .bind(&ledger.entity)
        .bind(&ledger.trigger)
        .bind(ledger.started_at)
        .bind(&ledger.rules_hash)
        .execute(&mut *tx)
        .await
        .map_err(db("recording the run start"))?;
        sqlx::query("INSERT INTO sluice.runs (run_id, tenant, pipeline, started_at) VALUES ($1, $2, $3, $4)")
            .bind(&ledger.run_id)
            .bind(tenant.as_str())
            .bind(&ledger.pipeline)
            .bind(ledger.started_at)
            .execute(&mut *tx)
            .await
            .map_err(db("indexing the run"))?;
        tx.commit().await.map_err(db("committing the run start"))
    }

    async fn commit_batch(
        &self,
        scope: &RunScope,
        batch: &LoadBatch,
        expected_version: i64,
    ) -> Result<BatchCommitted> {
        let commit = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        let tenant = &scope.tenant;
        let entity = batch.entity;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the batch transaction"))?;
        let version = fence(&mut tx, scope, batch.cursor.as_ref(), expected_version).await?;

        let mut counts = RowCounts {
            rows_read: batch.rows_read,
            quarantined: batch.quarantine.len() as u64,
            deduplicated: batch.deduplicated,
            ..RowCounts::default()
        };
        if !batch.load.is_empty() {
            let target = table(tenant, entity.name());
            let ids = strings(&batch.rows, "external_id");
            let keys: Vec<&str> = batch.load.iter().map(|&r| ids.value(r as usize)).collect();
            let loaded_at = Utc::now().timestamp_micros();
            let cols: Vec<String> = load_columns(entity)
                .iter()
                .map(|c| quote_ident(c))
                .collect();
            let copy_target = format!(
                "COPY {target} ({}) FROM STDIN (FORMAT binary)",
                cols.join(", ")
            );
            let all: Vec<(u32, u128)> = batch
                .load
                .iter()
                .copied()
                .zip(batch.fingerprints.iter().copied())
                .collect();

            // A batch of only new keys (the whole of a first load) is copied straight into
            // the table. Optimistically, when its first key is new: a key that turns out to
            // exist aborts the COPY with a unique violation, rolled back to a savepoint, and
            // the batch takes the classifying path below. The fence serialises writers of
            // this pipeline, so no key appears between the check and the write.
            let first_is_new: bool = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT NOT EXISTS (SELECT 1 FROM {target} WHERE source = $1 AND external_id = $2)"
            )))
            .bind(&scope.pipeline)
            .bind(keys[0])
            .fetch_one(&mut *tx)
            .await
            .map_err(db(format!("looking up existing {entity}")))?;
            let mut copied_all = false;
            if first_is_new {
                sqlx::raw_sql("SAVEPOINT sluice_fresh")
                    .execute(&mut *tx)
                    .await
                    .map_err(db("savepoint"))?;
                let data = copy_rows(
                    entity,
                    &batch.rows,
                    &batch.deleted_at,
                    &all,
                    &scope.pipeline,
                    loaded_at,
                    &scope.run_id,
                );
                match copy_in(&mut tx, &copy_target, data).await {
                    Ok(()) => copied_all = true,
                    Err(e) if is_unique_violation(&e) => {
                        sqlx::raw_sql("ROLLBACK TO SAVEPOINT sluice_fresh")
                            .execute(&mut *tx)
                            .await
                            .map_err(db("rolling back to the savepoint"))?;
                    }
                    Err(e) => {
                        return Err(EngineError::from_sqlx(format!("copying new {entity}"), e));
                    }
                }
            }
            let (known, fresh) = if copied_all {
                counts.inserted += all.len() as u64;
                (Vec::new(), Vec::new())
            } else {
                // Keys the warehouse already holds go through staging and classification;
                // the others are copied straight in.
                let existing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT external_id FROM {target} WHERE source = $1 AND external_id = ANY($2::text[])"
                )))
                .bind(&scope.pipeline)
                .bind(&keys)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(format!("looking up existing {entity}")))?;
                let existing: std::collections::HashSet<&str> =
                    existing.iter().map(String::as_str).collect();
                all.iter()
                    .zip(&keys)
                    .partition::<Vec<_>, _>(|(_, key)| existing.contains(**key))
            };
            let known: Vec<(u32, u128)> = known.into_iter().map(|(pair, _)| *pair).collect();
            let fresh: Vec<(u32, u128)> = fresh.into_iter().map(|(pair, _)| *pair).collect();
            // The inserted rows' part of the finance rollups (the triggers keep updates and
            // deletions; rows inserted are summed here, from the batch).
            let inserted = if copied_all { &all } else { &fresh };
            let delta = RollupDelta::of_inserts(entity, &batch.rows, &batch.deleted_at, inserted);

            if !fresh.is_empty() {
                let data = copy_rows(
                    entity,
                    &batch.rows,
                    &batch.deleted_at,
                    &fresh,
                    &scope.pipeline,
                    loaded_at,
                    &scope.run_id,
                );
                copy_in(&mut tx, &copy_target, data)
                    .await
                    .map_err(db(format!("copying new {entity}")))?;
                counts.inserted += fresh.len() as u64;
            }
            if let Some(delta) = delta {
                delta.apply(&mut tx, tenant).await?;
            }
            if !known.is_empty() {
                let stage = quote_ident(&format!("sluice_stage_{}", entity.name()));
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {target} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )))
                .execute(&mut *tx)
                .await
                .map_err(db("creating the staging table"))?;
                let data = copy_rows(
                    entity,
                    &batch.rows,
                    &batch.deleted_at,
                    &known,
                    &scope.pipeline,
                    loaded_at,
                    &scope.run_id,
                );
                let mut copy = tx
                    .copy_in_raw(&format!(
                        "COPY pg_temp.{stage} ({}) FROM STDIN (FORMAT binary)",
                        cols.join(", ")
                    ))
                    .await
                    .map_err(db("starting COPY"))?;
                copy.send(data).await.map_err(db("sending rows"))?;
                copy.finish().await.map_err(db("finishing COPY"))?;
            }
            self.fire("after_copy", &mut tx, commit).await?;
            if !known.is_empty() {
                let fates = sqlx::query(AssertSqlSafe(classify_upsert_sql(tenant, entity)))
                    .bind(&scope.run_id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db(format!("upserting {entity}")))?;
                for r in fates {
                    let fate: String = r.try_get("fate").map_err(db("fate"))?;
                    let n = r.try_get::<i64, _>("n").map_err(db("count"))? as u64;
                    match fate.as_str() {
                        "insert" => counts.inserted += n,
                        "update" => counts.updated += n,
                        "unchanged" => counts.unchanged += n,
                        _ => counts.deduplicated += n,
                    }
                }
            }
        }

        if !batch.tombstones.is_empty() {
            let (ids, at): (Vec<&str>, Vec<i64>) = batch
                .tombstones
                .iter()
                .map(|(id, at)| (id.as_str(), *at))
                .unzip();
            let marked = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {target} t SET deleted_at = to_timestamp(d.at / 1000000.0), run_id = $2, loaded_at = now() \
                 FROM UNNEST($3::text[], $4::int8[]) AS d(id, at) \
                 WHERE t.source = $1 AND t.external_id = d.id AND t.deleted_at IS NULL",
                target = table(tenant, entity.name())
            )))
            .bind(&scope.pipeline)
            .bind(&scope.run_id)
            .bind(&ids)
            .bind(&at)
            .execute(&mut *tx)
            .await
            .map_err(db(format!("marking deleted {entity}")))?
            .rows_affected();
            counts.updated += marked;
            counts.unchanged += ids.len() as u64 - marked;
        }

        let quarantine = distinct_quarantine(batch);
        if !quarantine.is_empty() {
            let ids: Vec<String> = quarantine
                .iter()
                .map(|_| uuid::Uuid::now_v7().to_string())
                .collect();
            let locations: Vec<&str> = quarantine
                .iter()
                .map(|(_, _, q)| q.position.location.as_str())
                .collect();
            let sheets: Vec<Option<&str>> = quarantine
                .iter()
                .map(|(_, _, q)| q.position.sheet.as_deref())
                .collect();
            let rows: Vec<i64> = quarantine
                .iter()
                .map(|(_, _, q)| q.position.row as i64)
                .collect();
            let raws: Vec<&str> = quarantine.iter().map(|(r, _, _)| r.as_str()).collect();
            let hashes: Vec<&str> = quarantine.iter().map(|(_, h, _)| h.as_str()).collect();
            let errors: Vec<String> = quarantine
                .iter()
                .map(|(_, _, q)| serde_json::to_string(&q.errors).unwrap_or_else(|_| "[]".into()))
                .collect();
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (id, run_id, pipeline, entity, status, location, sheet, source_row, raw, raw_text, raw_hash, errors, rules, created_at) \
                 SELECT q.id, $2, $3, $4, 'pending', q.loc, q.sheet, q.row, q.raw::jsonb, q.raw, q.hash, q.errors::jsonb, $5, now() \
                 FROM UNNEST($1::text[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], $11::text[]) \
                   AS q(id, loc, sheet, row, raw, hash, errors) \
                 ON CONFLICT (pipeline, raw_hash) WHERE status IN ('pending', 'fixed') DO UPDATE SET \
                   run_id = EXCLUDED.run_id, location = EXCLUDED.location, sheet = EXCLUDED.sheet, \
                   source_row = EXCLUDED.source_row, errors = EXCLUDED.errors, rules = EXCLUDED.rules",
                table(tenant, "quarantine")
            )))
            .bind(ids)
            .bind(&scope.run_id)
            .bind(&scope.pipeline)
            .bind(entity.name())
            .bind(&scope.rules_hash)
            .bind(locations)
            .bind(sheets)
            .bind(rows)
            .bind(raws)
            .bind(hashes)
            .bind(errors)
            .execute(&mut *tx)
            .await
            .map_err(db("writing quarantine"))?;
        }

        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET rows_read = rows_read + $1, inserted = inserted + $2, updated = updated + $3, \
             unchanged = unchanged + $4, quarantined = quarantined + $5, deduplicated = deduplicated + $6 WHERE run_id = $7",
            table(tenant, "runs")
        )))
        .bind(counts.rows_read as i64)
        .bind(counts.inserted as i64)
        .bind(counts.updated as i64)
        .bind(counts.unchanged as i64)
        .bind(counts.quarantined as i64)
        .bind(counts.deduplicated as i64)
        .bind(&scope.run_id)
        .execute(&mut *tx)
        .await
        .map_err(db("updating the run ledger"))?;
        tx.commit().await.map_err(db("committing the batch"))?;
        Ok(BatchCommitted { counts, version })
    }

    async fn set_cursor(
        &self,
        scope: &RunScope,
        cursor: Option<&Value>,
        expected_version: i64,
    ) -> Result<i64> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the cursor transaction"))?;
        let version = fence(&mut tx, scope, cursor, expected_version).await?;
        tx.commit().await.map_err(db("committing the cursor"))?;
        Ok(version)
    }

    async fn finish_run(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
        status: RunStatus,
        error: Option<&str>,
    ) -> Result<RunLedger> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET status = $1, finished_at = now(), error = $2 WHERE run_id = $3",
            table(tenant, "runs")
        )))
        .bind(status.as_str())
        .bind(error)
        .bind(run_id)
        .execute(&self.pool)
        .await
        .map_err(db("recording the run end"))?;
        self.run(tenant, run_id)
            .await?
            .ok_or_else(|| EngineError::new(ErrorKind::NotFound, format!("run {run_id} vanished")))
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
        self.prepare_tenant(tenant).await?;
        let (source, who) = match side {
            AgingSide::Receivable => (table(tenant, "invoices"), "customer"),
            AgingSide::Payable => (table(tenant, "bills"), "vendor"),
        };
        let rows: Vec<AgingRow<String>> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT currency, id, MAX(name), \
                   {AGING_BUCKET_SQL} AS bucket, \
                   (SUM(CASE WHEN kind = 'credit_note' THEN -balance ELSE balance END) * 10000)::numeric(38, 0)::text \
                 FROM (SELECT currency, kind, balance, {who}_id AS id, {who}_name AS name, ($1::date - due_date) AS d \
                       FROM {source} WHERE balance > 0 AND status <> 'void' AND deleted_at IS NULL AND due_date IS NOT NULL) q \
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
        self.prepare_tenant(tenant).await?;
        let side = match side {
            AgingSide::Receivable => "invoice",
            AgingSide::Payable => "bill",
        };
        let rows: Vec<(String, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT currency, {AGING_BUCKET_SQL} AS bucket, (SUM(amount) * 10000)::numeric(38, 0)::text \
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

    async fn invoices(&self, tenant: &TenantSlug) -> Result<Vec<Invoice>> {
        let rows = self.live_rows(tenant, "invoices").await?;
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

    async fn bills(&self, tenant: &TenantSlug) -> Result<Vec<Bill>> {
        let rows = self.live_rows(tenant, "bills").await?;
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
        })
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
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET status = 'replayed', replay_run = $1, replayed_at = now() \
             WHERE id = ANY($2) AND status IN ('pending', 'fixed')",
            table(tenant, "quarantine")
        )))
        .bind(run_id)
        .bind(replayed)
        .execute(&mut *tx)
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
        .execute(&mut *tx)
        .await
        .map_err(db("recording replayed rows' errors"))?;
        let n = failed.len() as i64;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET rows_read = rows_read + $1, quarantined = quarantined + $1 WHERE run_id = $2",
            table(tenant, "runs")
        )))
        .bind(n)
        .bind(run_id)
        .execute(&mut *tx)
        .await
        .map_err(db("updating the run ledger"))?;
        tx.commit()
            .await
            .map_err(db("committing the replay's quarantine"))
    }

    async fn record_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let tenant = TenantSlug::parse(&letter.tenant)?;
        self.prepare_tenant(&tenant).await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (id, pipeline, job_kind, job, attempts, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            table(&tenant, "dead_letters")
        )))
        .bind(&letter.id)
        .bind(&letter.pipeline)
        .bind(&letter.job_kind)
        .bind(sqlx::types::Json(&letter.job))
        .bind(sqlx::types::Json(&letter.attempts))
        .bind(&letter.reason)
        .bind(letter.created_at)
        .execute(&self.pool)
        .await
        .map_err(db("recording a dead letter"))?;
        Ok(())
    }

    async fn dead_letters(&self, tenant: &TenantSlug, limit: u32) -> Result<Vec<DeadLetter>> {
        self.prepare_tenant(tenant).await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} ORDER BY created_at DESC, seq DESC LIMIT $1",
            table(tenant, "dead_letters")
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing dead letters"))?;
        rows.iter()
            .map(|r| dead_letter_from_row(tenant, r))
            .collect()
    }

    async fn dead_letter(&self, tenant: &TenantSlug, id: &str) -> Result<Option<DeadLetter>> {
        self.prepare_tenant(tenant).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} WHERE id = $1",
            table(tenant, "dead_letters")
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a dead letter"))?;
        row.map(|r| dead_letter_from_row(tenant, &r)).transpose()
    }

    async fn mark_dead_letter_replayed(
        &self,
        tenant: &TenantSlug,
        id: &str,
        run_id: &str,
    ) -> Result<bool> {
        self.prepare_tenant(tenant).await?;
        let res = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET replayed_at = now(), replay_run = $1 WHERE id = $2 AND replayed_at IS NULL",
            table(tenant, "dead_letters")
        )))
        .bind(run_id)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("marking a dead letter replayed"))?;
        Ok(res.rows_affected() == 1)
    }

    async fn payments(&self, tenant: &TenantSlug) -> Result<Vec<Payment>> {
        let rows = self.live_rows(tenant, "payments").await?;
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

fn dead_letter_from_row(tenant: &TenantSlug, r: &PgRow) -> Result<DeadLetter> {
    let job: sqlx::types::Json<Value> = get(r, "job")?;
    let attempts: sqlx::types::Json<Value> = get(r, "attempts")?;
    Ok(DeadLetter {
        id: get(r, "id")?,
        tenant: tenant.to_string(),
        pipeline: get(r, "pipeline")?,
        job_kind: get(r, "job_kind")?,
        job: job.0,
        attempts: attempts.0,
        reason: get(r, "reason")?,
        created_at: get(r, "created_at")?,
        replayed_at: get(r, "replayed_at")?,
        replay_run: get(r, "replay_run")?,
    })
}

async fn copy_in(
    tx: &mut Transaction<'static, Postgres>,
    statement: &str,
    data: Vec<u8>,
) -> std::result::Result<(), sqlx::Error> {
    let mut copy = tx.copy_in_raw(statement).await?;
    copy.send(data).await?;
    copy.finish().await.map(|_| ())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

async fn fence(
    tx: &mut Transaction<'static, Postgres>,
    scope: &RunScope,
    cursor: Option<&Value>,
    expected_version: i64,
) -> Result<i64> {
    // Taking the row lock first makes a racing run wait here, then see the new version.
    let res = sqlx::query(
        "UPDATE sluice.stream_state SET cursor = $1, version = version + 1, updated_at = now() \
         WHERE tenant = $2 AND pipeline = $3 AND stream = $4 AND version = $5",
    )
    .bind(cursor.map(sqlx::types::Json))
    .bind(scope.tenant.as_str())
    .bind(&scope.pipeline)
    .bind(&scope.stream)
    .bind(expected_version)
    .execute(&mut **tx)
    .await
    .map_err(db("advancing the stream cursor"))?;
    if res.rows_affected() != 1 {
        return Err(EngineError::new(
            ErrorKind::Fenced,
            format!(
                "pipeline '{}' stream '{}' moved past version {expected_version}: another run committed; this run stops without committing",
                scope.pipeline, scope.stream
            ),
        ));
    }
    Ok(expected_version + 1)
}

/// A stored amount with the two-or-four decimal display the SQLite warehouse gives.
fn normalize(d: Option<Decimal>) -> Result<Decimal> {
    let d = d.unwrap_or_default();
    let units = (d * Decimal::from(10i64.pow(MONEY_SCALE)))
        .trunc()
        .to_i128()
        .ok_or_else(|| {
            EngineError::new(ErrorKind::Warehouse, format!("amount {d} out of range"))
        })?;
    Ok(display_decimal(units))
}

fn get<T>(row: &PgRow, col: &str) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(col)
        .map_err(|e| EngineError::from_sqlx(format!("reading column {col}"), e))
}

fn ledger_from_row(tenant: &TenantSlug, r: &PgRow) -> Result<RunLedger> {
    let status: String = get(r, "status")?;
    let count = |c: &str| -> Result<u64> { Ok(get::<i64>(r, c)? as u64) };
    Ok(RunLedger {
        run_id: get(r, "run_id")?,
        tenant: tenant.to_string(),
        pipeline: get(r, "pipeline")?,
        entity: get(r, "entity")?,
        trigger: get(r, "trigger")?,
        started_at: get(r, "started_at")?,
        finished_at: get(r, "finished_at")?,
        status: RunStatus::parse(&status).ok_or_else(|| {
            EngineError::new(ErrorKind::Warehouse, format!("unknown run status {status}"))
        })?,
        counts: RowCounts {
            rows_read: count("rows_read")?,
            inserted: count("inserted")?,
            updated: count("updated")?,
            unchanged: count("unchanged")?,
            quarantined: count("quarantined")?,
            deduplicated: count("deduplicated")?,
        },
        rules_hash: get(r, "rules_hash")?,
        error: get(r, "error")?,
    })
}

fn quarantined_from_row(tenant: &TenantSlug, r: &PgRow) -> Result<QuarantinedRow> {
    let status: String = get(r, "status")?;
    let raw: String = get(r, "raw_text")?;
    let errors: sqlx::types::Json<Vec<crate::validate::CellError>> = get(r, "errors")?;
    let bad = |what: &str| {
        EngineError::new(
            ErrorKind::Warehouse,
            format!("quarantine row has bad {what}"),
        )
    };
    Ok(QuarantinedRow {
        id: get(r, "id")?,
        tenant: tenant.to_string(),
        run_id: get(r, "run_id")?,
        pipeline: get(r, "pipeline")?,
        entity: get(r, "entity")?,
        status: QuarantineStatus::parse(&status).ok_or_else(|| bad("status"))?,
        position: SourcePosition {
            location: get(r, "location")?,
            sheet: get(r, "sheet")?,
            row: get::<i64>(r, "source_row")? as u64,
        },
        raw: serde_json::from_str(&raw).map_err(|e| bad("raw").with_source(e))?,
        errors: errors.0,
        created_at: get(r, "created_at")?,
    })
}

impl PipelineStore for PostgresWarehouse {
    async fn save_pipeline(
        &self,
        tenant: &TenantSlug,
        name: &str,
        spec: &Value,
        secrets: &serde_json::Map<String, Value>,
    ) -> Result<()> {
        let sealed = if secrets.is_empty() {
            None
        } else {
            let key = self.data_key(tenant).await?;
            Some(key.seal(
                Value::Object(secrets.clone()).to_string().as_bytes(),
                &secrets_context(tenant, name),
            ))
        };
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to store the pipeline"))?;
        sqlx::query(
            "INSERT INTO sluice.pipelines (tenant, name, spec, secrets) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, name) DO UPDATE SET spec = EXCLUDED.spec, secrets = EXCLUDED.secrets, updated_at = now()",
        )
        .bind(tenant.as_str())
        .bind(name)
        .bind(sqlx::types::Json(spec))
        .bind(sealed)
        .execute(&mut *tx)
        .await
        .map_err(db("storing the pipeline"))?;
        let secret_names: Vec<&String> = secrets.keys().collect();
        audit(
            &mut tx,
            "cli",
            "pipeline.store",
            Some(tenant.as_str()),
            name,
            serde_json::json!({ "secrets": secret_names }),
        )
        .await?;
        tx.commit().await.map_err(db("committing the pipeline"))
    }

    async fn pipeline(&self, tenant: &TenantSlug, name: &str) -> Result<Option<StoredPipeline>> {
        let row = sqlx::query(
            "SELECT spec, secrets, updated_at FROM sluice.pipelines WHERE tenant = $1 AND name = $2",
        )
        .bind(tenant.as_str())
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| control_error("reading the pipeline", e))?;
        let Some(row) = row else { return Ok(None) };
        let spec: sqlx::types::Json<Value> = row.try_get("spec").map_err(db("spec"))?;
        let sealed: Option<Vec<u8>> = row.try_get("secrets").map_err(db("secrets"))?;
        let secrets = match sealed {
            None => serde_json::Map::new(),
            Some(bytes) => {
                let key = self.data_key(tenant).await?;
                decode_secrets(&key.open(&bytes, &secrets_context(tenant, name))?)?
            }
        };
        Ok(Some(StoredPipeline {
            tenant: tenant.to_string(),
            name: name.to_string(),
            spec: spec.0,
            secrets,
            updated_at: row.try_get("updated_at").map_err(db("updated_at"))?,
        }))
    }

    async fn pipelines(&self, tenant: &TenantSlug) -> Result<Vec<StoredPipeline>> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sluice.pipelines WHERE tenant = $1 ORDER BY name")
                .bind(tenant.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(|e| control_error("listing pipelines", e))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(p) = self.pipeline(tenant, &name).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    async fn upload_run(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        sha256: &str,
    ) -> Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT run_id FROM sluice.uploads WHERE tenant = $1 AND pipeline = $2 AND sha256 = $3",
        )
        .bind(tenant.as_str())
        .bind(pipeline)
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| control_error("reading uploads", e))
    }

    async fn record_upload(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        sha256: &str,
        size: u64,
        run_id: &str,
    ) -> Result<String> {
        sqlx::query(
            "INSERT INTO sluice.uploads (tenant, pipeline, sha256, run_id, size) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant, pipeline, sha256) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(pipeline)
        .bind(sha256)
        .bind(run_id)
        .bind(size as i64)
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("recording the upload", e))?;
        Ok(self
            .upload_run(tenant, pipeline, sha256)
            .await?
            .unwrap_or_else(|| run_id.to_string()))
    }

    async fn delete_pipeline(&self, tenant: &TenantSlug, name: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM sluice.pipelines WHERE tenant = $1 AND name = $2")
            .bind(tenant.as_str())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("deleting the pipeline", e))?
            .rows_affected();
        Ok(n == 1)
    }

    async fn scheduled_pipelines(&self) -> Result<Vec<ScheduledPipeline>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT tenant, name, spec->'schedule'->>'cron' FROM sluice.pipelines \
             WHERE spec->'schedule'->>'cron' IS NOT NULL ORDER BY tenant, name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("listing scheduled pipelines", e))?;
        Ok(rows
            .into_iter()
            .map(|(tenant, name, cron)| ScheduledPipeline { tenant, name, cron })
            .collect())
    }
}

fn key_from_row(r: &PgRow) -> Result<ApiKeyRecord> {
    let role: String = get(r, "role")?;
    Ok(ApiKeyRecord {
        id: get(r, "id")?,
        prefix: get(r, "prefix")?,
        hash: get(r, "hash")?,
        tenant: get(r, "tenant")?,
        role: Role::parse(&role).ok_or_else(|| {
            EngineError::new(ErrorKind::Warehouse, format!("unknown role {role:?}"))
        })?,
        name: get(r, "name")?,
        created_at: get(r, "created_at")?,
        revoked_at: get(r, "revoked_at")?,
    })
}

impl AccessStore for PostgresWarehouse {
    async fn provision_tenant(&self, tenant: &TenantSlug, name: &str) -> Result<bool> {
        if self.tenant_info(tenant).await?.is_some() {
            return Ok(false);
        }
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        self.create_tenant(tenant, name, master).await?;
        Ok(true)
    }

    async fn create_key(&self, key: &ApiKeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO sluice.api_keys (id, prefix, hash, tenant, role, name, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.id)
        .bind(&key.prefix)
        .bind(&key.hash)
        .bind(&key.tenant)
        .bind(key.role.as_str())
        .bind(&key.name)
        .bind(key.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("storing the API key", e))?;
        Ok(())
    }

    async fn key_by_prefix(&self, prefix: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT * FROM sluice.api_keys WHERE prefix = $1")
            .bind(prefix)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| control_error("reading the API key", e))?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    async fn keys(&self, tenant: Option<&TenantSlug>) -> Result<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM sluice.api_keys WHERE tenant IS NOT DISTINCT FROM $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(tenant.map(TenantSlug::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("listing API keys", e))?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, tenant: Option<&TenantSlug>, id: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE sluice.api_keys SET revoked_at = now() WHERE id = $1 AND tenant IS NOT DISTINCT FROM $2 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(tenant.map(TenantSlug::as_str))
        .execute(&self.pool)
        .await
        .map_err(|e| control_error("revoking the API key", e))?
        .rows_affected();
        Ok(n == 1)
    }

    async fn record_audit(
        &self,
        actor: &str,
        action: &str,
        tenant: Option<&TenantSlug>,
        target: &str,
        detail: &Value,
    ) -> Result<()> {
        sqlx::query("INSERT INTO sluice.audit_log (actor, action, tenant, target, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(actor)
            .bind(action)
            .bind(tenant.map(TenantSlug::as_str))
            .bind(target)
            .bind(sqlx::types::Json(detail))
            .execute(&self.pool)
            .await
            .map_err(|e| control_error("writing the audit log", e))?;
        Ok(())
    }

    async fn audit_log(
        &self,
        tenant: &TenantSlug,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, tenant, target, detail FROM sluice.audit_log \
             WHERE tenant = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        )
        .bind(tenant.as_str())
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| control_error("reading the audit log", e))?;
        rows.iter()
            .map(|r| {
                let detail: Option<sqlx::types::Json<Value>> = get(r, "detail")?;
                Ok(AuditEntry {
                    id: get(r, "id")?,
                    at: get(r, "at")?,
                    actor: get(r, "actor")?,
                    action: get(r, "action")?,
                    tenant: get(r, "tenant")?,
                    target: get::<Option<String>>(r, "target")?.unwrap_or_default(),
                    detail: detail.map_or(Value::Null, |d| d.0),
                })
            })
            .collect()
    }
}
