//! Pipelines: the pipeline file, the mapping from source columns to canonical entities, and
//! the runner that wires a source through the stages into a warehouse.

pub mod error;
pub mod map;
pub mod prepare;
pub mod replay;
pub mod runner;
pub mod source;
pub mod spec;
pub mod stored;
pub mod tokens;

pub use error::{PipelineError, PipelineErrorKind};
pub use runner::{Quiet, RunObserver, RunOptions, RunReport, run_pipeline};
pub use source::PipelineSource;
pub use spec::PipelineSpec;
pub use stored::register_pipeline;
pub use tokens::StoredTokens;
