//! File sources: CSV and spreadsheets. Files are read on a dedicated thread that hands
//! batches to the async side through a bounded channel, so parsing never blocks an async
//! worker and memory stays at a few batches whatever the file size.

mod csv;
pub mod limits;
mod spreadsheet;

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

pub use self::csv::{CsvOptions, CsvSource};
pub use self::spreadsheet::{SheetRef, SpreadsheetSource};
use crate::error::{SourceError, SourceErrorKind};
use crate::source::{BatchStream, RejectedRecord, SourceBatch};

/// Batches buffered between the reader thread and the consumer.
const CHANNEL_DEPTH: usize = 2;

/// Identifies one version of a file cheaply: size, modification time and a hash of its
/// first 64 KiB. A cursor made for another version of the file is not honoured.
pub(crate) fn fingerprint(path: &Path) -> Result<String, SourceError> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut head = vec![0u8; 64 * 1024];
    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
    let n = read_up_to(&mut file, &mut head).map_err(|e| io_error(path, e))?;
    let mut h = Sha256::new();
    h.update(&head[..n]);
    let digest: String = h
        .finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("{}-{}-{}", meta.len(), mtime, digest))
}

pub(crate) fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Checks that `path` names a non-empty regular file.
pub(crate) fn check_file(path: &Path) -> Result<u64, SourceError> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !meta.is_file() {
        return Err(SourceError::new(
            SourceErrorKind::Config,
            format!("{} is not a file", path.display()),
        ));
    }
    if meta.len() == 0 {
        return Err(SourceError::new(
            SourceErrorKind::Format,
            format!("{} is empty (0 bytes): nothing to load", path.display()),
        ));
    }
    Ok(meta.len())
}

pub(crate) fn io_error(path: &Path, e: std::io::Error) -> SourceError {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => SourceErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => SourceErrorKind::Config,
        _ => SourceErrorKind::Transient,
    };
    let what = match e.kind() {
        std::io::ErrorKind::NotFound => "file not found",
        std::io::ErrorKind::PermissionDenied => "permission denied reading",
        _ => "cannot read",
    };
    SourceError::new(kind, format!("{what}: {}", path.display())).with_source(e)
}

/// Builds string batches of a fixed set of columns, row by row.
pub(crate) struct BatchBuilder {
    schema: SchemaRef,
    columns: Vec<StringBuilder>,
    positions: Vec<u64>,
    rejects: Vec<RejectedRecord>,
}

impl BatchBuilder {
    pub(crate) fn new(headers: &[String]) -> Self {
        let schema = string_schema(headers);
        let columns = headers.iter().map(|_| StringBuilder::new()).collect();
        BatchBuilder {
            schema,
            columns,
            positions: Vec::new(),
            rejects: Vec::new(),
        }
    }

    /// Records buffered (rows and rejects).
    pub(crate) fn len(&self) -> usize {
        self.positions.len() + self.rejects.len()
    }

    pub(crate) fn push_row<'a>(
        &mut self,
        position: u64,
        cells: impl Iterator<Item = Option<&'a str>>,
    ) {
        for (builder, cell) in self.columns.iter_mut().zip(cells) {
            builder.append_option(cell);
        }
        self.positions.push(position);
    }

    pub(crate) fn reject(&mut self, record: RejectedRecord) {
        self.rejects.push(record);
    }

    pub(crate) fn finish(
        &mut self,
        cursor: Value,
        location: &str,
        sheet: Option<&str>,
    ) -> Result<SourceBatch, SourceError> {
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        let records = if arrays.is_empty() {
            RecordBatch::new_empty(self.schema.clone())
        } else {
            RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| {
                SourceError::new(SourceErrorKind::Format, "building a record batch").with_source(e)
            })?
        };
        Ok(SourceBatch {
            deletions: Vec::new(),
            records,
            positions: std::mem::take(&mut self.positions),
            rejects: std::mem::take(&mut self.rejects),
            cursor,
            location: location.to_string(),
            sheet: sheet.map(str::to_string),
        })
    }
}

pub(crate) fn string_schema(headers: &[String]) -> SchemaRef {
    Arc::new(Schema::new(
        headers
            .iter()
            .map(|h| Field::new(h, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

/// Names header cells: blanks become `column_N` (1-based); a repeated name is an error,
/// since mapping by name would be ambiguous.
pub(crate) fn normalise_headers(raw: Vec<String>, path: &Path) -> Result<Vec<String>, SourceError> {
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for (i, h) in raw.into_iter().enumerate() {
        let h = h.trim().to_string();
        let name = if h.is_empty() {
            format!("column_{}", i + 1)
        } else {
            h
        };
        if let Some(first) = out.iter().position(|o| *o == name) {
            return Err(SourceError::new(
                SourceErrorKind::Format,
                format!(
                    "{}: column '{name}' appears twice in the header (columns {} and {}); rename one",
                    path.display(),
                    first + 1,
                    i + 1
                ),
            ));
        }
        out.push(name);
    }
    Ok(out)
}

/// The raw values of a record whose cell count does not match the header: named cells
/// under their header, the rest under `_extra_N`.
pub(crate) fn raw_record<'a>(
    headers: &[String],
    cells: impl Iterator<Item = Option<&'a str>>,
) -> Map<String, Value> {
    let mut raw = Map::new();
    for (i, cell) in cells.enumerate() {
        let key = headers
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("_extra_{}", i + 1));
        raw.insert(
            key,
            cell.map_or(Value::Null, |c| Value::String(c.to_string())),
        );
    }
    raw
}

/// Runs `produce` on its own thread, feeding batches through a bounded channel. `produce`
/// gets a `send` callback that returns false once the consumer has gone away.
pub(crate) fn spawn_reader<F>(name: &str, produce: F) -> Result<BatchStream, SourceError>
where
    F: FnOnce(&mut dyn FnMut(Result<SourceBatch, SourceError>) -> bool) + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    std::thread::Builder::new()
        .name(format!("sluice-{name}-reader"))
        .spawn(move || {
            let mut send = |item| tx.blocking_send(item).is_ok();
            produce(&mut send);
        })
        .map_err(|e| {
            SourceError::new(SourceErrorKind::Transient, "starting the reader thread")
                .with_source(e)
        })?;
    Ok(crate::source::channel_stream(rx))
}
