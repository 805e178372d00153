//! Pipelines: the pipeline file, the mapping from source columns to canonical entities, and
//! the runner that wires a source through the stages into a warehouse.

pub mod confine;
pub mod definition;
pub mod error;
pub mod infer;
pub mod map;
pub mod registry;
pub mod replay;
pub mod runner;
pub mod source;
pub mod spec;
pub mod stages;
pub mod token_store;

pub use confine::{Confinement, SourceReach};
pub use error::{PipelineError, PipelineErrorKind};
pub use registry::{carry_secrets, register_pipeline};
pub use runner::{Quiet, RunObserver, RunOptions, RunReport, run_pipeline};
pub use source::PipelineSource;
pub use spec::PipelineSpec;
pub use token_store::StoredTokens;
