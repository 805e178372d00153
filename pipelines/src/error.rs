//! Pipeline failures: one type for everything a run can hit, keeping the kind of the layer
//! it came from so callers can decide whether to retry, and the error itself as the cause
//! (`source()`), so nothing beneath is flattened into a string.

use std::error::Error as StdError;
use std::fmt;

use sluice_connectors::{SourceError, SourceErrorKind};
use sluice_engine::{EngineError, ErrorKind};

/// Where a pipeline failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineErrorKind {
    /// The pipeline definition is wrong.
    Config,
    /// The source failed.
    Source(SourceErrorKind),
    /// The engine or warehouse failed.
    Engine(ErrorKind),
}

/// A pipeline failure; carries the run id when a run had started.
#[derive(Debug)]
pub struct PipelineError {
    kind: PipelineErrorKind,
    /// What went wrong at this layer; empty when the cause says it all.
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
    run_id: Option<String>,
}

impl PipelineError {
    /// A new error.
    pub fn new(kind: PipelineErrorKind, message: impl Into<String>) -> Self {
        PipelineError {
            kind,
            message: message.into(),
            source: None,
            run_id: None,
        }
    }

    /// A pipeline definition that is wrong.
    pub fn config(message: impl Into<String>) -> Self {
        PipelineError::new(PipelineErrorKind::Config, message)
    }

    /// The same error caused by `source` (its text follows the message).
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Records which run failed.
    pub fn in_run(mut self, run_id: &str) -> Self {
        self.run_id = Some(run_id.to_string());
        self
    }

    /// The kind.
    pub fn kind(&self) -> PipelineErrorKind {
        self.kind
    }

    /// The failed run, if one had started.
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    /// The whole message, the cause's text included.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// Whether running again later may succeed (network, rate limits, an unavailable
    /// warehouse); permanent failures need a person.
    pub fn is_transient(&self) -> bool {
        match self.kind {
            PipelineErrorKind::Config => false,
            PipelineErrorKind::Source(k) => k.is_transient(),
            PipelineErrorKind::Engine(k) => k.is_transient(),
        }
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, self.message.is_empty()) {
            (Some(source), true) => write!(f, "{source}"),
            (Some(source), false) => write!(f, "{}: {source}", self.message),
            (None, _) => f.write_str(&self.message),
        }
    }
}

impl StdError for PipelineError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<EngineError> for PipelineError {
    fn from(e: EngineError) -> Self {
        PipelineError::new(PipelineErrorKind::Engine(e.kind()), "").with_source(e)
    }
}

impl From<SourceError> for PipelineError {
    /// A failure that may pass says so first, as the warehouse's does, so that a reader of
    /// a failed attempt knows which side went away.
    fn from(e: SourceError) -> Self {
        let message = match e.kind() {
            SourceErrorKind::Transient => "source unavailable",
            SourceErrorKind::RateLimited => "source asked to slow down",
            _ => "",
        };
        PipelineError::new(PipelineErrorKind::Source(e.kind()), message).with_source(e)
    }
}
