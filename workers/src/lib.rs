//! Workers: the job queues (Redis or embedded SQLite), the workers that run syncs from them
//! under the retry policy, webhook deliveries, pipeline locks and idempotency keys, the cron scheduler, and the
//! program's Prometheus metrics.

pub mod coord;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod poll;
pub mod queue;
pub mod rate_gate;
pub mod retry;
pub mod scheduler;
pub mod webhooks;
pub mod worker;

pub use error::{WorkerError, WorkerErrorKind};
pub use queue::{
    IdempotencyKey, JobResult, JobStatus, QueueName, QueueSettings, QueuedRun, Queues,
    TriggerOutcome, TriggerRequest, Triggered,
};
