//! Workers: pipeline locks and idempotency keys, the retry policy, and (to come) the job
//! queues and the scheduler.

pub mod error;
pub mod jobs;
pub mod lock;
pub mod retry;

pub use error::{WorkerError, WorkerErrorKind};
