//! Worker failures: the queue, the lock, or the job itself. A failure keeps its cause
//! (`source()`), so a caller can look beneath the message.

use std::error::Error as StdError;
use std::fmt;

/// Where a worker failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerErrorKind {
    /// Redis, the embedded queue or the store failed: worth retrying later.
    Queue,
    /// A job's payload or configuration is wrong.
    Job,
    /// What was asked for does not exist.
    NotFound,
    /// What was asked for was done already (a dead letter replayed once).
    Conflict,
}

impl WorkerErrorKind {
    /// Whether asking again later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, WorkerErrorKind::Queue)
    }
}

/// A worker failure.
#[derive(Debug)]
pub struct WorkerError {
    kind: WorkerErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl WorkerError {
    /// A new error.
    pub fn new(kind: WorkerErrorKind, message: impl Into<String>) -> Self {
        WorkerError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The same error caused by `source` (its text follows the message).
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind.
    pub fn kind(&self) -> WorkerErrorKind {
        self.kind
    }
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl StdError for WorkerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}
