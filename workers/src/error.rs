//! Worker failures: the queue, the lock, or the job itself.

use std::fmt;

/// Where a worker failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerErrorKind {
    /// Redis or the embedded queue failed.
    Queue,
    /// A job's payload or configuration is wrong.
    Job,
}

/// A worker failure.
#[derive(Debug)]
pub struct WorkerError {
    kind: WorkerErrorKind,
    message: String,
}

impl WorkerError {
    /// A new error.
    pub fn new(kind: WorkerErrorKind, message: impl Into<String>) -> Self {
        WorkerError {
            kind,
            message: message.into(),
        }
    }

    /// The kind.
    pub fn kind(&self) -> WorkerErrorKind {
        self.kind
    }
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WorkerError {}
