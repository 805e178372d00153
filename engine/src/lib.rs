//! sluice's engine: the canonical finance entities and the stages every row passes through
//! after its source (validate, dedupe, quarantine, load), the run ledger whose accounting
//! every run must balance, and the warehouses rows land in.
//!
//! The engine never talks to a source and never drops a row: a row is loaded, quarantined
//! or counted as a duplicate, and the ledger proves which.

pub mod columns;
pub mod control;
pub mod currency;
pub mod dedupe;
pub mod entity;
pub mod error;
pub mod finance_rules;
pub mod ledger;
pub mod money;
pub mod quarantine;
pub mod secrets;
pub mod tenant;
pub mod time;
pub mod validate;
pub mod warehouse;

pub use control::Store;
pub use entity::{Entity, FieldKind, FieldSpec};
pub use error::{EngineError, ErrorKind, Result};
pub use ledger::{JobLedger, RowCounts, RunLedger, RunStatus, RunTrigger, RunView};
pub use tenant::TenantSlug;
pub use warehouse::{
    DeadLetterStore, FinanceStore, LoadStore, QuarantineStore, RunHistory, SqliteWarehouse,
    Warehouse,
};

/// The store traits, for code that calls them on a concrete warehouse
/// (`use sluice_engine::prelude::*;`).
pub mod prelude {
    pub use crate::control::{AccessStore, DeadLetterStore, PipelineStore, Store};
    pub use crate::warehouse::{FinanceStore, LoadStore, QuarantineStore, RunHistory, Warehouse};
}
