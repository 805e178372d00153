//! The control store: what the API, the CLI, the workers and the scheduler share besides
//! the warehouse's rows: pipeline definitions (secrets sealed), API keys and the audit log,
//! dead letters, webhook endpoints and their deliveries. Both warehouse backends keep it
//! beside their tables; [`Store`] is a warehouse that also keeps it, the one bound the API
//! and the CLI are written against.

mod access;
mod dead_letters;
mod keys;
mod pipelines;
mod webhook_store;
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
pub use webhook_store::{
    DeliveryAttempt, DeliveryStatus, NewWebhookEndpoint, WebhookDelivery, WebhookEndpoint,
    WebhookEvent, WebhookStore,
};
pub(crate) use webhook_store::{new_endpoint_id, webhook_secret_context};

use crate::warehouse::Warehouse;

/// A warehouse that also stores pipelines, keys, the audit log, dead letters and webhooks.
pub trait Store: Warehouse + PipelineStore + AccessStore + WebhookStore + 'static {}

impl<T: Warehouse + PipelineStore + AccessStore + WebhookStore + 'static> Store for T {}
