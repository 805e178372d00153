//! The warehouse: where loaded rows, quarantined rows, the run ledger and stream cursors
//! live, one isolated store per tenant.
//!
//! The contract is split by who needs it: a run needs only [`LoadStore`] (its doc is the
//! commit contract: atomic, fenced, idempotent); the API, the CLI and the finance
//! aggregates read through [`RunHistory`], [`QuarantineStore`] and [`FinanceStore`]. A
//! [`Warehouse`] is all of them. The control store (pipelines, keys, audit, dead letters)
//! is [`crate::control`]; both backends keep it beside their warehouse.
//!
//! Each backend is a folder with one file per concern: `load` (the commit path),
//! `runs`, `quarantine`, `finance`, `dead_letters`, `pipelines`, `access`, `migrate`;
//! `rows` decodes stored rows into the engine's types through one backend-neutral
//! decoder ([`rows`]).

mod finance;
mod load;
#[cfg(any(test, feature = "test-utils"))]
pub mod memory;
mod postgres;
mod quarantine;
pub(crate) mod rows;
mod runs;
pub(crate) mod sql;
mod sqlite;

pub use finance::FinanceStore;
pub(crate) use finance::{AgingRow, DocumentRow, decode_counts, encode_counts};
pub use load::{BatchCommitted, LoadBatch, LoadStore, ReplaySettlement, RunScope, StreamState};
pub use postgres::{DEFAULT_POOL_SIZE, FaultHook, FaultPoint, PostgresWarehouse, TenantInfo};
pub use quarantine::QuarantineStore;
pub use runs::RunHistory;
pub use sqlite::SqliteWarehouse;
pub use sqlite::backup::{
    BackupFile, BackupManifest, backup_data_dir, restore_data_dir, verify_backup,
};

pub use crate::control::DeadLetterStore;

/// Everything a warehouse answers: the load contract and every read. Implemented for any
/// type that implements the parts.
pub trait Warehouse:
    LoadStore + RunHistory + QuarantineStore + FinanceStore + DeadLetterStore
{
}

impl<T> Warehouse for T where
    T: LoadStore + RunHistory + QuarantineStore + FinanceStore + DeadLetterStore
{
}
