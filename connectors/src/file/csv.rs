//! CSV files: streaming (csv crate), configurable delimiter, quote and header; UTF-8 with or
//! without BOM, CRLF and quoted newlines. Before the first batch the whole file is checked
//! to be UTF-8 text, so a binary or wrongly encoded file fails the run before anything is
//! committed. A line with the wrong number of cells is a rejected record, never a dropped one.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ::csv::{Position, ReaderBuilder, StringRecord};
use serde_json::{Value, json};

use super::{
    BatchBuilder, check_file, fingerprint, io_error, normalise_headers, raw_record, spawn_reader,
};
use crate::error::{SourceError, SourceErrorKind};
use crate::source::{
    BatchStream, HealthReport, ReadRequest, RejectedRecord, Source, SourceBatch, StreamInfo,
    SyncMode,
};

/// How a CSV file is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// Field delimiter (default `,`).
    pub delimiter: u8,
    /// Quote character (default `"`).
    pub quote: u8,
    /// Whether the first record names the columns (default true). Without a header,
    /// columns are `column_1`, `column_2`, ...
    pub has_header: bool,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: b',',
            quote: b'"',
            has_header: true,
        }
    }
}

/// A CSV file. Its one stream is named after the file.
#[derive(Debug, Clone)]
pub struct CsvSource {
    path: PathBuf,
    options: CsvOptions,
}

impl CsvSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>, options: CsvOptions) -> Self {
        CsvSource {
            path: path.into(),
            options,
        }
    }

    fn stream_name(&self) -> String {
        self.path
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned())
    }

    fn reader<R: Read>(&self, file: R) -> ::csv::Reader<R> {
        ReaderBuilder::new()
            .delimiter(self.options.delimiter)
            .quote(self.options.quote)
            .has_headers(self.options.has_header)
            .flexible(true)
            .from_reader(file)
    }

    /// Opens the file after checking it is non-empty UTF-8 text, and reads the header.
    fn open(&self) -> Result<(CsvReader, RecordLayout), SourceError> {
        check_file(&self.path)?;
        let crlf = check_utf8_text(&self.path)?;
        let file = File::open(&self.path).map_err(|e| io_error(&self.path, e))?;
        let mut rdr = self.reader(BufReader::with_capacity(256 * 1024, file));
        let headers = if self.options.has_header {
            let h = rdr.headers().map_err(|e| csv_error(&self.path, e))?.clone();
            if h.is_empty() {
                return Err(SourceError::new(
                    SourceErrorKind::Format,
                    format!("{}: no header row", self.path.display()),
                ));
            }
            h.iter().map(str::to_string).collect()
        } else {
            let mut probe =
                self.reader(File::open(&self.path).map_err(|e| io_error(&self.path, e))?);
            let mut first = StringRecord::new();
            probe
                .read_record(&mut first)
                .map_err(|e| csv_error(&self.path, e))?;
            (1..=first.len()).map(|i| format!("column_{i}")).collect()
        };
        Ok((
            rdr,
            RecordLayout {
                headers: normalise_headers(headers, &self.path)?,
                crlf,
            },
        ))
    }
}

fn csv_error(path: &Path, e: ::csv::Error) -> SourceError {
    let at = e
        .position()
        .map(|p| format!(" at line {}", p.line()))
        .unwrap_or_default();
    SourceError::new(
        SourceErrorKind::Format,
        format!("{}: unreadable CSV{at}", path.display()),
    )
    .with_source(e)
}

/// The longest line, and the largest record, a CSV file may hold: a record is one row of
/// a batch held in memory, and no ledger row is a megabyte.
pub(crate) const MAX_LINE_BYTES: usize = 1 << 20;

/// Reads the whole file once, in 1 MiB chunks, and fails on a line over
/// [`MAX_LINE_BYTES`], NUL bytes (binary), a UTF-16
/// byte-order mark, a ZIP signature (a spreadsheet) or the first byte sequence that is not
/// UTF-8, naming the line it is on.
///
/// Returns whether the file's lines end in CRLF: the csv crate reports a record's line one
/// short after a CRLF line ending, and the reader corrects for it.
fn check_utf8_text(path: &Path) -> Result<bool, SourceError> {
    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut carry = 0usize; // bytes of an incomplete UTF-8 sequence kept from the last chunk
    let mut line = 1u64;
    let mut offset = 0u64;
    let mut first = true;
    let mut crlf = false;
    let mut since_newline = 0usize;
    loop {
        let n = super::read_up_to(&mut file, &mut buf[carry..]).map_err(|e| io_error(path, e))?;
        let len = carry + n;
        if len == 0 {
            return Ok(crlf);
        }
        let chunk = &buf[..len];
        if first {
            first = false;
            let format_err = |what: &str| {
                SourceError::new(
                    SourceErrorKind::Format,
                    format!("{} {what}", path.display()),
                )
            };
            if chunk.starts_with(&[0xFF, 0xFE]) || chunk.starts_with(&[0xFE, 0xFF]) {
                return Err(format_err(
                    "is UTF-16 text; save it as UTF-8 (CSV UTF-8) and retry",
                ));
            }
            if chunk.starts_with(b"PK\x03\x04") {
                return Err(format_err(
                    "is a ZIP archive (an XLSX workbook?), not a CSV file; use kind = \"xlsx\"",
                ));
            }
            if chunk[..chunk.len().min(8192)].contains(&0) {
                return Err(format_err(
                    "looks binary (it contains NUL bytes); expected a CSV text file",
                ));
            }
            crlf = chunk.windows(2).any(|w| w == b"\r\n");
        }
        let (valid_up_to, bad) = match std::str::from_utf8(chunk) {
            Ok(_) => (len, false),
            Err(e) if e.error_len().is_none() && n > 0 => (e.valid_up_to(), false),
            Err(e) => (e.valid_up_to(), true),
        };
        for &b in &chunk[..valid_up_to] {
            if b == b'\n' {
                line += 1;
                since_newline = 0;
            } else {
                since_newline += 1;
                if since_newline > MAX_LINE_BYTES {
                    return Err(SourceError::new(
                        SourceErrorKind::Format,
                        format!(
                            "{}: line {line} is longer than {MAX_LINE_BYTES} bytes (limit max_record_bytes); the file was refused before reading it",
                            path.display()
                        ),
                    ));
                }
            }
        }
        if bad {
            return Err(SourceError::new(
                SourceErrorKind::Format,
                format!(
                    "{} is not valid UTF-8 at line {line} (byte {}); re-export it as UTF-8",
                    path.display(),
                    offset + valid_up_to as u64
                ),
            ));
        }
        offset += valid_up_to as u64;
        buf.copy_within(valid_up_to..len, 0);
        carry = len - valid_up_to;
        if n == 0 {
            // End of file with a dangling partial sequence.
            if carry > 0 {
                return Err(SourceError::new(
                    SourceErrorKind::Format,
                    format!(
                        "{} ends inside a UTF-8 sequence at line {line}; the file is truncated or not UTF-8",
                        path.display()
                    ),
                ));
            }
            return Ok(crlf);
        }
    }
}

impl Source for CsvSource {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        let this = self.clone();
        let headers =
            tokio::task::spawn_blocking(move || this.open().map(|(_, layout)| layout.headers))
                .await
                .map_err(|e| {
                    SourceError::new(SourceErrorKind::Transient, "reader task failed")
                        .with_source(e)
                })??;
        Ok(vec![StreamInfo {
            name: self.stream_name(),
            schema: super::string_schema(&headers),
            sync_mode: SyncMode::FullRefresh,
        }])
    }

    async fn check(&self) -> Result<HealthReport, SourceError> {
        let started = Instant::now();
        let streams = self.streams().await?;
        let columns = streams.first().map_or(0, |s| s.schema.fields().len());
        Ok(HealthReport {
            detail: format!(
                "{} is readable UTF-8 CSV with {columns} columns",
                self.path.display()
            ),
            latency: started.elapsed(),
        })
    }

    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        let this = self.clone();
        let (rdr, layout, fp) = tokio::task::spawn_blocking(move || {
            let (rdr, layout) = this.open()?;
            let fp = fingerprint(&this.path)?;
            Ok::<_, SourceError>((rdr, layout, fp))
        })
        .await
        .map_err(|e| {
            SourceError::new(SourceErrorKind::Transient, "reader task failed").with_source(e)
        })??;
        let resume = resume_position(request.from.as_ref(), &fp, &self.path);
        let path = self.path.clone();
        let batch_rows = request.batch_rows.max(1);
        spawn_reader("csv", move |send| {
            read_records(rdr, layout, fp, resume, path, batch_rows, send)
        })
    }
}

/// The position to resume at, if `cursor` was made for this same file.
fn resume_position(cursor: Option<&Value>, fp: &str, path: &Path) -> Option<Position> {
    let cursor = cursor?;
    if cursor.get("fingerprint").and_then(Value::as_str) != Some(fp) {
        tracing::info!(file = %path.display(), "saved cursor belongs to another version of the file; reading from the start");
        return None;
    }
    let mut pos = Position::new();
    pos.set_byte(cursor.get("byte")?.as_u64()?)
        .set_line(cursor.get("line")?.as_u64()?)
        .set_record(cursor.get("record")?.as_u64()?);
    Some(pos)
}

type CsvReader = ::csv::Reader<BufReader<File>>;

/// The header and line-ending style of a file being read.
struct RecordLayout {
    headers: Vec<String>,
    crlf: bool,
}

fn read_records(
    mut rdr: CsvReader,
    layout: RecordLayout,
    fp: String,
    resume: Option<Position>,
    path: PathBuf,
    batch_rows: usize,
    send: &mut dyn FnMut(Result<SourceBatch, SourceError>) -> bool,
) {
    let location = path.display().to_string();
    let RecordLayout { headers, crlf } = layout;
    let line_fix = u64::from(crlf);
    if let Some(pos) = resume
        && let Err(e) = rdr.seek(pos)
    {
        send(Err(csv_error(&path, e)));
        return;
    }
    let mut builder = BatchBuilder::new(&headers);
    let mut record = StringRecord::new();
    let width = headers.len();
    loop {
        match rdr.read_record(&mut record) {
            Ok(true) => {
                let line = record
                    .position()
                    .map_or(0, |p| p.line() + if p.byte() > 0 { line_fix } else { 0 });
                // A quoted field may span lines, each within the line limit: the record
                // as a whole is held to it too.
                if record.as_byte_record().as_slice().len() > MAX_LINE_BYTES {
                    send(Err(SourceError::new(
                        SourceErrorKind::Format,
                        format!(
                            "{location}: the record at line {line} is longer than {MAX_LINE_BYTES} bytes (limit max_record_bytes)"
                        ),
                    )));
                    return;
                }
                if record.len() == width {
                    builder.push_row(line, record.iter().map(Some));
                } else {
                    let raw = raw_record(&headers, record.iter().map(Some));
                    builder.reject(RejectedRecord {
                        position: line,
                        raw,
                        rule: "ragged_row",
                        message: format!(
                            "line {line} has {} cells; the header has {width}",
                            record.len()
                        ),
                    });
                }
            }
            Ok(false) => break,
            Err(e) => {
                // The file was checked to be UTF-8 before reading, so this is I/O or a
                // change to the file while it was read.
                send(Err(csv_error(&path, e)));
                return;
            }
        }
        if builder.len() >= batch_rows {
            let cursor = cursor_at(&fp, rdr.position());
            match builder.finish(cursor, &location, None) {
                Ok(batch) => {
                    if !send(Ok(batch)) {
                        return;
                    }
                }
                Err(e) => {
                    send(Err(e));
                    return;
                }
            }
        }
    }
    if builder.len() > 0 {
        let cursor = cursor_at(&fp, rdr.position());
        let _ = send(builder.finish(cursor, &location, None));
    }
}

fn cursor_at(fp: &str, pos: &Position) -> Value {
    json!({ "fingerprint": fp, "byte": pos.byte(), "line": pos.line(), "record": pos.record() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_check_names_the_line_of_the_first_bad_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("latin1.csv");
        std::fs::write(&p, b"a,b\n1,2\n3,caf\xe9\n").expect("write");
        let err = check_utf8_text(&p).expect_err("latin-1 accepted");
        assert!(err.message().contains("line 3"), "{err}");
    }

    #[test]
    fn utf8_check_accepts_sequences_split_across_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("big.csv");
        let mut body = b"a\n".to_vec();
        while body.len() < (1 << 20) - 1 {
            body.push(b'x');
        }
        body.extend_from_slice("é\n".as_bytes()); // straddles the 1 MiB boundary
        std::fs::write(&p, &body).expect("write");
        check_utf8_text(&p).expect("valid UTF-8 rejected");
    }
}
