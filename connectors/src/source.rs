//! The `Source` trait: the one contract every connector keeps.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use futures_core::Stream;
use serde_json::{Map, Value};

use crate::error::SourceError;

/// How a stream is read on the next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every run reads everything; the cursor only lets an interrupted run resume, and is
    /// cleared when a run completes (files).
    FullRefresh,
    /// Each run reads what changed since the cursor the last run committed (SQL tables by
    /// `updated_at, id`, APIs by last-modified time).
    Incremental,
}

/// A stream a source offers, with the schema of the batches it yields.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// The stream's name (a file's sheet, a table, an API entity).
    pub name: String,
    /// The columns of its batches, as the source names them.
    pub schema: SchemaRef,
    /// How it is read.
    pub sync_mode: SyncMode,
}

/// The outcome of a health check.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// What was checked and found, in one line.
    pub detail: String,
    /// How long the check took.
    pub latency: Duration,
}

/// What to read.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    /// The stream name (as listed by [`Source::streams`]).
    pub stream: String,
    /// Resume after this cursor; `None` reads from the start.
    pub from: Option<Value>,
    /// Target number of records per batch.
    pub batch_rows: usize,
}

/// A record the source read but could not turn into a row of the batch's schema (a ragged
/// CSV line, an undecodable record). It is never dropped: the runner quarantines it.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRecord {
    /// Its source position (see [`SourceBatch::positions`]).
    pub position: u64,
    /// Column -> value as far as they could be read; extra cells under `_extra_N`.
    pub raw: Map<String, Value>,
    /// The rule it broke (e.g. `ragged_row`).
    pub rule: &'static str,
    /// What was wrong.
    pub message: String,
}

/// A record the source reports as deleted (an API's tombstone): only its id and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// Its source position (see [`SourceBatch::positions`]).
    pub position: u64,
    /// The deleted record's `external_id`.
    pub external_id: String,
    /// When it was deleted, UTC microseconds.
    pub deleted_at: i64,
}

/// One batch of a stream.
#[derive(Debug, Clone)]
pub struct SourceBatch {
    /// The records, one row each, in source order.
    pub records: RecordBatch,
    /// Per row of `records`: its position in the source (CSV: the line it starts on;
    /// spreadsheet: the sheet row; SQL/API: its ordinal in the read).
    pub positions: Vec<u64>,
    /// Records read in this batch that could not become rows.
    pub rejects: Vec<RejectedRecord>,
    /// Records the source reports deleted; the warehouse marks its copies deleted.
    pub deletions: Vec<Deletion>,
    /// The cursor reached at the end of this batch: committing it means every record up to
    /// here is loaded or quarantined.
    pub cursor: Value,
    /// Where the records come from (file path, table, endpoint), for quarantine records.
    pub location: String,
    /// The worksheet, for spreadsheets.
    pub sheet: Option<String>,
}

impl SourceBatch {
    /// Records read in this batch: rows, rejects and deletions together.
    pub fn records_read(&self) -> u64 {
        (self.records.num_rows() + self.rejects.len() + self.deletions.len()) as u64
    }
}

/// The batches of one read, in source order. Ends after the last batch or at the first error.
pub type BatchStream = Pin<Box<dyn Stream<Item = Result<SourceBatch, SourceError>> + Send>>;

/// The receiving end of a reader task or thread, as a [`BatchStream`].
struct ChannelStream(tokio::sync::mpsc::Receiver<Result<SourceBatch, SourceError>>);

impl Stream for ChannelStream {
    type Item = Result<SourceBatch, SourceError>;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Wraps a channel fed by a reader as a [`BatchStream`].
pub(crate) fn channel_stream(
    rx: tokio::sync::mpsc::Receiver<Result<SourceBatch, SourceError>>,
) -> BatchStream {
    Box::pin(ChannelStream(rx))
}

/// A place finance records are read from.
///
/// Contract:
/// - `read` yields batches in source order; the `cursor` of a batch covers every record up
///   to and including that batch, and reading again from it yields exactly the records
///   after it: none skipped, none repeated. Rows that share a cursor value (one
///   `updated_at`) are told apart by the cursor (an `id` tie-breaker), never by luck.
/// - A cursor is opaque JSON to everyone but the source that made it; a source given a
///   cursor it cannot honour (another file, a changed query) says so in its logs and reads
///   from the start rather than guessing.
/// - Sources stream: memory stays bounded by a few batches, however large the input.
/// - Errors that make the whole input unusable (missing, binary, not decodable, refused
///   credentials) are returned before the first batch when they can be detected there, so
///   a run fails without committing anything. A record that cannot be read is a
///   [`RejectedRecord`], not an error.
/// - Errors carry a [`crate::SourceErrorKind`]: transient ones (network, 5xx, 429) are
///   worth retrying from the last committed cursor; permanent ones are not.
/// - Credentials never appear in errors, logs or cursors.
pub trait Source: Send + Sync {
    /// The streams this source offers and their schemas.
    fn streams(&self) -> impl Future<Output = Result<Vec<StreamInfo>, SourceError>> + Send;

    /// Checks that the source can be read (file readable, server reachable, credentials
    /// accepted, privileges present).
    fn check(&self) -> impl Future<Output = Result<HealthReport, SourceError>> + Send;

    /// Starts reading a stream.
    fn read(
        &self,
        request: ReadRequest,
    ) -> impl Future<Output = Result<BatchStream, SourceError>> + Send;
}
