//! Pipeline failures: one type for everything a run can hit, keeping the kind of the layer
//! it came from so callers can decide whether to retry.

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
    message: String,
    run_id: Option<String>,
}

impl PipelineError {
    /// A new error.
    pub fn new(kind: PipelineErrorKind, message: impl Into<String>) -> Self {
        PipelineError {
            kind,
            message: message.into(),
            run_id: None,
        }
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

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
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
        f.write_str(&self.message)
    }
}

impl std::error::Error for PipelineError {}

impl From<EngineError> for PipelineError {
    fn from(e: EngineError) -> Self {
        PipelineError::new(PipelineErrorKind::Engine(e.kind()), e.to_string())
    }
}

impl From<SourceError> for PipelineError {
    fn from(e: SourceError) -> Self {
        PipelineError::new(PipelineErrorKind::Source(e.kind()), e.to_string())
    }
}
