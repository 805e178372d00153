//! Spreadsheets: XLSX through calamine's streaming cell reader (the sheet is never loaded
//! whole); XLS, XLSB and ODS through calamine's range reader, which those formats require
//! (they are small by nature: XLS caps at 65,536 rows). Excel date cells become ISO dates,
//! numbers keep the 15 significant digits Excel shows, formulas give their cached values,
//! and rows with no value at all are skipped.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use calamine::{Data, Reader, Xlsx, open_workbook_auto};
use chrono::Timelike;
use serde_json::{Value, json};

use super::limits::{SpreadsheetLimits, check_workbook};
use super::{BatchBuilder, check_file, fingerprint, normalise_headers, raw_record, spawn_reader};
use crate::error::{SourceError, SourceErrorKind};
use crate::source::{
    BatchStream, HealthReport, ReadRequest, RejectedRecord, Source, StreamInfo, SyncMode,
};

/// Which worksheet to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SheetRef {
    /// By name, as shown on the tab.
    Name(String),
    /// By position, 0 for the first sheet.
    Index(usize),
}

/// A spreadsheet file (`.xlsx`, `.xlsm`, `.xls`, `.xlsb`, `.ods`). Its one stream is the
/// chosen sheet.
#[derive(Debug, Clone)]
pub struct SpreadsheetSource {
    path: PathBuf,
    sheet: SheetRef,
    header_row: u32,
    limits: SpreadsheetLimits,
}

impl SpreadsheetSource {
    /// A source reading `sheet` of `path`, with column names on `header_row` (1-based, as
    /// Excel numbers rows).
    pub fn new(path: impl Into<PathBuf>, sheet: SheetRef, header_row: u32) -> Self {
        SpreadsheetSource {
            path: path.into(),
            sheet,
            header_row: header_row.max(1),
            limits: SpreadsheetLimits::default(),
        }
    }

    /// The same source under other limits.
    pub fn with_limits(mut self, limits: SpreadsheetLimits) -> Self {
        self.limits = limits;
        self
    }

    fn is_xlsx(&self) -> bool {
        let ext = self
            .path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        matches!(ext.as_str(), "xlsx" | "xlsm")
    }

    fn format_error(&self, e: impl std::error::Error + Send + Sync + 'static) -> SourceError {
        SourceError::new(
            SourceErrorKind::Format,
            format!(
                "{} is not a readable spreadsheet (corrupt, or not the format its name says)",
                self.path.display()
            ),
        )
        .with_source(e)
    }

    fn resolve_sheet(&self, names: &[String]) -> Result<String, SourceError> {
        let found = match &self.sheet {
            SheetRef::Name(n) => names.iter().find(|s| *s == n).cloned(),
            SheetRef::Index(i) => names.get(*i).cloned(),
        };
        found.ok_or_else(|| {
            SourceError::new(
                SourceErrorKind::Config,
                format!(
                    "{}: no sheet {:?}; its sheets are: {}",
                    self.path.display(),
                    self.sheet,
                    names.join(", ")
                ),
            )
        })
    }

    /// Opens the workbook and reads the header row; everything that can make the whole
    /// file unusable surfaces here, before any batch.
    fn open_headers(&self) -> Result<(String, Vec<String>), SourceError> {
        check_file(&self.path)?;
        check_workbook(&self.path, &self.limits)?;
        let mut header_cells: Vec<Option<String>> = Vec::new();
        let header_row = self.header_row;
        let sheet = self.scan(
            &mut |row, cells| {
                if row == header_row {
                    header_cells = cells;
                }
                row < header_row
            },
            Some(header_row),
        )?;
        if header_cells.iter().all(Option::is_none) {
            return Err(SourceError::new(
                SourceErrorKind::Format,
                format!(
                    "{} sheet '{sheet}': row {} (the header row) is empty",
                    self.path.display(),
                    self.header_row
                ),
            ));
        }
        let headers = header_cells
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        Ok((sheet, normalise_headers(headers, &self.path)?))
    }

    /// Walks the sheet's non-empty rows in order, calling `visit(row_number, cells)` until it
    /// returns false. With `stop_after`, stops once past that row.
    fn scan(
        &self,
        visit: &mut dyn FnMut(u32, Vec<Option<String>>) -> bool,
        stop_after: Option<u32>,
    ) -> Result<String, SourceError> {
        if self.is_xlsx() {
            let mut wb: Xlsx<BufReader<File>> =
                calamine::open_workbook(&self.path).map_err(|e| self.format_error(e))?;
            let sheet = self.resolve_sheet(&wb.sheet_names())?;
            let mut cells = wb
                .worksheet_cells_reader(&sheet)
                .map_err(|e| self.format_error(e))?;
            let mut current: Option<(u32, Vec<Option<String>>)> = None;
            while let Some(cell) = cells.next_cell().map_err(|e| self.format_error(e))? {
                let (r, c) = cell.get_position();
                let row = r + 1;
                if current.as_ref().is_some_and(|(cr, _)| *cr != row)
                    && let Some((cr, vals)) = current.take()
                    && vals.iter().any(Option::is_some)
                    && !visit(cr, vals)
                {
                    return Ok(sheet);
                }
                if stop_after.is_some_and(|s| row > s) {
                    return Ok(sheet);
                }
                let entry = current.get_or_insert_with(|| (row, Vec::new()));
                let value = cell_text(&Data::from(cell.get_value().clone()));
                if c >= self.limits.max_columns {
                    return Err(SourceError::new(
                        SourceErrorKind::Format,
                        format!(
                            "{}: a cell is past column {} (limit max_columns)",
                            self.path.display(),
                            self.limits.max_columns
                        ),
                    ));
                }
                let c = c as usize;
                if entry.1.len() <= c {
                    entry.1.resize(c + 1, None);
                }
                entry.1[c] = value;
            }
            if let Some((cr, vals)) = current
                && vals.iter().any(Option::is_some)
            {
                visit(cr, vals);
            }
            Ok(sheet)
        } else {
            let mut wb = open_workbook_auto(&self.path).map_err(|e| self.format_error(e))?;
            let sheet = self.resolve_sheet(&wb.sheet_names())?;
            let range = wb
                .worksheet_range(&sheet)
                .map_err(|e| self.format_error(e))?;
            let Some((start_row, start_col)) = range.start() else {
                return Ok(sheet);
            };
            for (i, cells) in range.rows().enumerate() {
                let row = start_row + i as u32 + 1;
                if stop_after.is_some_and(|s| row > s) {
                    break;
                }
                let mut vals = vec![None; start_col as usize];
                vals.extend(cells.iter().map(cell_text));
                if vals.iter().any(Option::is_some) && !visit(row, vals) {
                    break;
                }
            }
            Ok(sheet)
        }
    }
}

/// A cell as text: what a person sees in Excel, without float noise.
fn cell_text(value: &Data) -> Option<String> {
    match value {
        Data::Empty => None,
        Data::String(s) if s.is_empty() => None,
        Data::String(s) | Data::DateTimeIso(s) | Data::DurationIso(s) => Some(s.clone()),
        Data::Int(i) => Some(i.to_string()),
        Data::Float(f) => Some(excel_number(*f)),
        Data::Bool(b) => Some(b.to_string()),
        Data::DateTime(dt) => Some(match dt.as_datetime() {
            Some(t)
                if dt.is_datetime()
                    && t.time().num_seconds_from_midnight() == 0
                    && t.time().nanosecond() == 0 =>
            {
                t.format("%Y-%m-%d").to_string()
            }
            Some(t) if dt.is_datetime() => t.format("%Y-%m-%dT%H:%M:%S").to_string(),
            _ => excel_number(dt.as_f64()),
        }),
        Data::Error(e) => Some(format!("{e}")),
    }
}

/// Formats a float with at most 15 significant digits, as Excel displays it: a formula's
/// `110.00000000000001` is the `110` the user sees.
fn excel_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        return format!("{}", f as i64);
    }
    let rounded: f64 = format!("{f:.14e}").parse().unwrap_or(f);
    format!("{rounded}")
}

impl Source for SpreadsheetSource {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        let this = self.clone();
        let (sheet, headers) = tokio::task::spawn_blocking(move || this.open_headers())
            .await
            .map_err(|e| {
                SourceError::new(SourceErrorKind::Transient, "reader task failed").with_source(e)
            })??;
        Ok(vec![StreamInfo {
            name: sheet,
            schema: super::string_schema(&headers),
            sync_mode: SyncMode::FullRefresh,
        }])
    }

    async fn check(&self) -> Result<HealthReport, SourceError> {
        let started = Instant::now();
        let streams = self.streams().await?;
        let (name, cols) = streams.first().map_or((String::new(), 0), |s| {
            (s.name.clone(), s.schema.fields().len())
        });
        Ok(HealthReport {
            detail: format!(
                "{} sheet '{name}' is readable with {cols} columns",
                self.path.display()
            ),
            latency: started.elapsed(),
        })
    }

    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        let this = self.clone();
        let (sheet, headers, fp) = tokio::task::spawn_blocking(move || {
            let (sheet, headers) = this.open_headers()?;
            Ok::<_, SourceError>((sheet, headers, fingerprint(&this.path)?))
        })
        .await
        .map_err(|e| {
            SourceError::new(SourceErrorKind::Transient, "reader task failed").with_source(e)
        })??;
        let resume_after =
            resume_row(request.from.as_ref(), &fp, &self.path).unwrap_or(self.header_row);
        let this = self.clone();
        let batch_rows = request.batch_rows.max(1);
        spawn_reader("spreadsheet", move |send| {
            let location = this.path.display().to_string();
            let mut builder = BatchBuilder::new(&headers);
            let width = headers.len();
            let mut failed = false;
            let mut last_row = resume_after;
            let mut flush = |builder: &mut BatchBuilder, last_row: u32| -> bool {
                let cursor = json!({ "fingerprint": fp, "row": last_row });
                send(builder.finish(cursor, &location, Some(&sheet)))
            };
            let result = this.scan(
                &mut |row, cells| {
                    if row <= resume_after {
                        return true;
                    }
                    last_row = row;
                    let extra = cells.iter().skip(width).any(Option::is_some);
                    if extra {
                        let raw = raw_record(&headers, cells.iter().map(Option::as_deref));
                        builder.reject(RejectedRecord {
                            position: u64::from(row),
                            raw,
                            rule: "ragged_row",
                            message: format!(
                                "row {row} has values beyond the {width} header columns"
                            ),
                        });
                    } else {
                        let mut cells = cells;
                        cells.resize(width, None);
                        builder.push_row(u64::from(row), cells.iter().map(Option::as_deref));
                    }
                    if builder.len() >= batch_rows && !flush(&mut builder, row) {
                        failed = true;
                        return false;
                    }
                    true
                },
                None,
            );
            match result {
                Err(e) => {
                    send(Err(e));
                }
                Ok(_) if !failed && builder.len() > 0 => {
                    flush(&mut builder, last_row);
                }
                Ok(_) => {}
            }
        })
    }
}

fn resume_row(cursor: Option<&Value>, fp: &str, path: &Path) -> Option<u32> {
    let cursor = cursor?;
    if cursor.get("fingerprint").and_then(Value::as_str) != Some(fp) {
        tracing::info!(file = %path.display(), "saved cursor belongs to another version of the workbook; reading from the start");
        return None;
    }
    cursor
        .get("row")?
        .as_u64()
        .and_then(|r| u32::try_from(r).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excel_numbers_lose_float_noise_but_not_digits() {
        assert_eq!(excel_number(110.00000000000001), "110");
        assert_eq!(excel_number(0.1 + 0.2), "0.3");
        assert_eq!(excel_number(1234.56), "1234.56");
        assert_eq!(excel_number(-5.0), "-5");
        assert_eq!(excel_number(1e20), "100000000000000000000");
    }
}
