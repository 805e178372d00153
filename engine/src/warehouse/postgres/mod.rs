//! The production warehouse: PostgreSQL, one schema per tenant (`tenant_<slug>`) plus the
//! control schema `sluice`. Every query is schema-qualified (nothing relies on
//! `search_path`) and every identifier is validated and quoted.
//!
//! One file per concern: `load` (the commit path), `copy` (binary COPY encoding),
//! `rollups` (finance sums kept in each batch's transaction), `runs`, `quarantine`,
//! `finance`, `dead_letters`, `pipelines`, `access`, `migrate` (provisioning and schema
//! versions), `rows` (column reads of this backend).

use crate::control::no_master_key;
use crate::error::{EngineError, ErrorKind, Result};
use crate::secrets::{DataKey, MasterKey};
use crate::tenant::TenantSlug;
use crate::warehouse::sql::quote_ident;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use migrate::TenantInfo;

mod access;
mod copy;
mod dead_letters;
mod finance;
mod keys;
mod load;
mod migrate;
mod pipelines;
mod quarantine;
mod rollups;
mod rows;
mod runs;
mod webhooks;

/// A named point in the commit path where a test can inject a fault (kill the connection,
/// stall), in the spirit of the `fail` crate's failpoints.
#[derive(Debug, Clone, Copy)]
pub struct FaultPoint {
    /// `after_copy`: the batch's rows are staged, nothing is upserted yet; `before_commit`:
    /// everything of the batch (rows, quarantine, ledger, a replay's settlement) is
    /// written, not yet committed.
    pub name: &'static str,
    /// The PostgreSQL backend running the batch's transaction.
    pub backend_pid: i32,
    /// 1-based count of batch commits this warehouse has started.
    pub commit: u64,
}

/// Called at every [`FaultPoint`].
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> BoxFuture<'static, ()> + Send + Sync>;

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

impl PostgresWarehouse {
    /// Connects to `url` (e.g. `postgres://user@127.0.0.1:5432/sluice`). The password, if
    /// any, is never included in errors.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_pool(url, DEFAULT_POOL_SIZE).await
    }

    /// Connects with at most `max_connections` connections in the pool (at least 1). Each
    /// process (serve, a worker, a scheduler) keeps one pool.
    pub async fn connect_with_pool(url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = url.parse().map_err(|_| {
            EngineError::new(
                ErrorKind::Config,
                "the database URL is not a valid postgres:// URL",
            )
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
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

    /// The tenant's data key, read in `conn`'s transaction and held against a key
    /// rotation (`FOR SHARE`) until that transaction ends.
    async fn data_key_held(
        &self,
        conn: &mut sqlx::PgConnection,
        tenant: &TenantSlug,
    ) -> Result<DataKey> {
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        let wrapped: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT wrapped_key FROM sluice.tenants WHERE slug = $1 FOR SHARE")
                .bind(tenant.as_str())
                .fetch_optional(conn)
                .await
                .map_err(|e| control_error("reading the tenant key", e))?;
        let wrapped = wrapped.ok_or_else(|| missing_tenant(tenant))?;
        master.unwrap_key(&wrapped, tenant.as_str())
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

/// The pool size of [`PostgresWarehouse::connect`].
pub const DEFAULT_POOL_SIZE: u32 = 8;

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

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}
