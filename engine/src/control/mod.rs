//! The control store: what the API, the CLI, the workers and the scheduler share besides
//! the warehouse's rows: pipeline definitions (secrets sealed), API keys and the audit log,
//! and dead letters. Both warehouse backends keep it beside their tables; [`Store`] is a
//! warehouse that also keeps it, the one bound the API and the CLI are written against.

mod access;
mod dead_letters;
mod keys;
mod pipelines;
pub mod webhooks;

pub use access::{
    AccessStore, ApiKeyRecord, AuditEntry, ConsoleSession, NewApiKey, Role, hash_key, key_prefix,
    random_hex, same_hash,
};
pub use dead_letters::{DeadLetter, DeadLetterStore};
pub use keys::KeyRotation;
pub use pipelines::{
    PipelineChange, PipelineOrigin, PipelineStore, ScheduledPipeline, StoredPipeline,
};
pub(crate) use pipelines::{decode_secrets, no_master_key, secrets_context};

use crate::warehouse::Warehouse;

/// A warehouse that also stores pipelines, keys, the audit log and dead letters.
pub trait Store: Warehouse + PipelineStore + AccessStore + 'static {}

impl<T: Warehouse + PipelineStore + AccessStore + 'static> Store for T {}
