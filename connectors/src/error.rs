//! Source failures, classified so the caller knows whether to retry: a file that is not a
//! CSV will never become one (permanent); a connection reset may pass (transient).

use std::error::Error as StdError;
use std::fmt;

/// What kind of failure a source hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceErrorKind {
    /// The source's configuration is wrong (missing path, unknown sheet, bad option).
    Config,
    /// The thing to read does not exist.
    NotFound,
    /// The input exists but is not in the expected format (binary, not UTF-8, corrupt).
    Format,
    /// Credentials were refused; an admin must reconnect.
    Auth,
    /// The service asked us to slow down.
    RateLimited,
    /// A network or server failure that may pass.
    Transient,
}

impl SourceErrorKind {
    /// Whether retrying later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            SourceErrorKind::RateLimited | SourceErrorKind::Transient
        )
    }
}

/// A source failure with a message that says what and where.
#[derive(Debug)]
pub struct SourceError {
    kind: SourceErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl SourceError {
    /// A new error.
    pub fn new(kind: SourceErrorKind, message: impl Into<String>) -> Self {
        SourceError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the cause.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with where it happened (`postgres:public.invoices: ...`).
    pub fn with_context(mut self, location: &str) -> Self {
        self.message = format!("{location}: {}", self.message);
        self
    }

    /// The kind.
    pub fn kind(&self) -> SourceErrorKind {
        self.kind
    }

    /// The message, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl StdError for SourceError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}
