#![doc = include_str!("../README.md")]

pub mod api;
pub mod error;
pub mod file;
mod source;
pub mod sql;

pub use error::{SourceError, SourceErrorKind};
pub use source::{
    BatchStream, Deletion, HealthReport, ReadRequest, RejectedRecord, Source, SourceBatch,
    StreamInfo, SyncMode,
};
