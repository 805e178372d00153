#![doc = include_str!("../README.md")]

pub mod egress;
pub mod error;
pub mod file;
pub mod saas;
mod source;
pub mod sql;

pub use error::{SourceError, SourceErrorKind};
pub use source::{
    BatchStream, Deletion, HealthReport, ReadRequest, RejectedRecord, Source, SourceBatch,
    StreamInfo, SyncMode,
};
