//! The engine's one error type: a kind callers can match on, a message that says what was
//! wrong and where, and the underlying cause. Messages never carry credentials.

use std::error::Error as StdError;
use std::fmt;

/// What went wrong, coarsely: enough for a caller to decide between retrying, failing the
/// run, or telling the user to fix their input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The pipeline definition or a command's arguments are wrong; retrying will not help.
    Config,
    /// The input itself is unusable as a whole (not just one bad row).
    Input,
    /// The warehouse could not be reached or answered with an error that may pass.
    WarehouseUnavailable,
    /// The warehouse rejected a statement; retrying the same thing will not help.
    Warehouse,
    /// Another run advanced the pipeline's cursor: this run no longer owns it and must stop.
    Fenced,
    /// A run's counts do not add up; nothing it reported can be trusted.
    AccountingMismatch,
    /// Something that was asked for does not exist (a tenant, a run, a quarantined row).
    NotFound,
}

impl ErrorKind {
    /// Whether the same work may succeed if tried again later.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::WarehouseUnavailable)
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Input => "unusable input",
            ErrorKind::WarehouseUnavailable => "warehouse unavailable",
            ErrorKind::Warehouse => "warehouse error",
            ErrorKind::Fenced => "lost ownership of the pipeline cursor",
            ErrorKind::AccountingMismatch => "run accounting does not add up",
            ErrorKind::NotFound => "not found",
        }
    }
}

/// An engine failure: [`ErrorKind`], a human message, and the cause when there is one.
#[derive(Debug)]
pub struct EngineError {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl EngineError {
    /// A new error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EngineError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the kind prefix or the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Wraps a database error, classifying connection problems as transient.
    pub fn from_sqlx(context: impl Into<String>, err: sqlx::Error) -> Self {
        let kind = match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => ErrorKind::WarehouseUnavailable,
            sqlx::Error::Database(db) if may_pass(db.code().as_deref()) => {
                ErrorKind::WarehouseUnavailable
            }
            _ => ErrorKind::Warehouse,
        };
        EngineError::new(kind, context).with_source(err)
    }
}

/// SQLite's BUSY/LOCKED/FULL and PostgreSQL's connection-class, serialization and
/// disk-full codes: failures that may pass (a full disk once space is freed; until then
/// the job's retries end in a dead letter that can be replayed).
fn may_pass(code: Option<&str>) -> bool {
    match code {
        Some(c) => {
            c == "5"
                || c == "6"
                || c == "13"
                || c.starts_with("08")
                || c == "40001"
                || c == "57P01"
                || c == "53100"
        }
        None => false,
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.describe(), self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl StdError for EngineError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// Shorthand for engine results.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
