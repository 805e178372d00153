//! Limits on what a spreadsheet may make the reader do. A workbook is a ZIP of XML parts,
//! and both layers can lie: a part that inflates a thousandfold, a cell at column ZZZZZZ
//! (a row resized to hundreds of millions of cells), a shared-strings table that claims a
//! billion entries (reserved up front). Before calamine opens a workbook, its parts are
//! inflated once as a stream (constant memory) and their XML scanned against these limits;
//! a file over one fails its run with a message naming the limit.

use std::io::{BufReader, Read};
use std::path::Path;

use quick_xml::events::{BytesStart, Event};

use crate::error::{SourceError, SourceErrorKind};

/// Limits on a spreadsheet. The defaults are Excel's own where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpreadsheetLimits {
    /// Columns of a sheet (Excel: 16,384, column XFD).
    pub max_columns: u32,
    /// Rows of a sheet (Excel: 1,048,576).
    pub max_rows: u32,
    /// Entries of the shared-strings table, as claimed and as present.
    pub max_shared_strings: u64,
    /// Bytes of all parts once inflated.
    pub max_inflated_bytes: u64,
    /// How many times larger than its compressed size a part may inflate (past 1 MiB).
    pub max_ratio: u64,
    /// Bytes of XML text between two tags of a sheet or the shared strings: a cell's
    /// value (Excel holds at most 32,767 characters, up to 4 bytes each, escaped).
    pub max_cell_bytes: u64,
}

impl Default for SpreadsheetLimits {
    fn default() -> Self {
        SpreadsheetLimits {
            max_columns: 16_384,
            max_rows: 1_048_576,
            max_shared_strings: 5_000_000,
            max_inflated_bytes: 512 << 20,
            max_ratio: 200,
            max_cell_bytes: 256 << 10,
        }
    }
}

fn over(path: &Path, what: String) -> SourceError {
    SourceError::new(
        SourceErrorKind::Format,
        format!(
            "{}: {what}; the file was refused before reading it",
            path.display()
        ),
    )
}

/// Checks a ZIP-based workbook (xlsx, xlsm, xlsb, ods) against `limits`. Not a ZIP: left
/// to the reader (XLS is bounded by its own format).
pub fn check_workbook(path: &Path, limits: &SpreadsheetLimits) -> Result<(), SourceError> {
    let file = std::fs::File::open(path).map_err(|e| {
        SourceError::new(
            SourceErrorKind::NotFound,
            format!("cannot open {}", path.display()),
        )
        .with_source(e)
    })?;
    let Ok(mut archive) = zip::ZipArchive::new(BufReader::new(file)) else {
        return Ok(());
    };
    let mut inflated_total = 0u64;
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(|e| {
            SourceError::new(
                SourceErrorKind::Format,
                format!("{} is not a readable workbook", path.display()),
            )
            .with_source(e)
        })?;
        let name = entry.name().map(|n| n.into_owned()).unwrap_or_default();
        let compressed = entry.compressed_size().max(1);
        let kind = if name.starts_with("xl/worksheets/") && name.ends_with(".xml") {
            Part::Sheet
        } else if name == "xl/sharedStrings.xml" {
            Part::SharedStrings
        } else {
            Part::Other
        };
        let mut counted = Counted {
            inner: entry,
            since_tag: 0,
            watch_text: kind != Part::Other,
            read: 0,
            budget: limits.max_inflated_bytes.saturating_sub(inflated_total),
            compressed,
            max_ratio: limits.max_ratio,
            path,
            name: &name,
            limits,
            breach: None,
        };
        let scanned = match kind {
            Part::Other => std::io::copy(&mut counted, &mut std::io::sink())
                .map(|_| ())
                .map_err(|e| {
                    SourceError::new(
                        SourceErrorKind::Format,
                        format!("{}: part {name} cannot be read", path.display()),
                    )
                    .with_source(e)
                }),
            Part::Sheet | Part::SharedStrings => scan_xml(&mut counted, kind, limits)
                .map_err(|e| over(path, format!("part {name}: {}", e.message()))),
        };
        // A limit met while inflating shows as a read error; say which limit.
        if let Some(breach) = counted.breach.take() {
            return Err(breach);
        }
        scanned?;
        inflated_total += counted.read;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Sheet,
    SharedStrings,
    Other,
}

/// A part's inflated bytes, counted against the total budget and the ratio.
struct Counted<'a, R> {
    inner: R,
    /// Bytes since the last `<`, in a part whose text is cells (bounded before the XML
    /// reader buffers a whole text node).
    since_tag: u64,
    watch_text: bool,
    read: u64,
    budget: u64,
    compressed: u64,
    max_ratio: u64,
    path: &'a Path,
    name: &'a str,
    limits: &'a SpreadsheetLimits,
    breach: Option<SourceError>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.watch_text {
            // A run longer than the limit inside one read shows at its end or runs
            // into the next read; reads are far shorter than the limit.
            self.since_tag = match buf[..n].iter().rposition(|b| *b == b'<') {
                Some(at) => (n - 1 - at) as u64,
                None => self.since_tag + n as u64,
            };
        }
        let breach = if self.watch_text && self.since_tag > self.limits.max_cell_bytes {
            Some(format!(
                "part {} holds a value longer than {} bytes (limit max_cell_bytes)",
                self.name, self.limits.max_cell_bytes
            ))
        } else if self.read > self.budget {
            Some(format!(
                "its parts inflate to more than {} bytes (limit max_inflated_bytes)",
                self.limits.max_inflated_bytes
            ))
        } else if self.read > (1 << 20) && self.read / self.compressed > self.max_ratio {
            Some(format!(
                "part {} inflates more than {} times its compressed size (limit max_ratio; a ZIP bomb?)",
                self.name, self.max_ratio
            ))
        } else {
            None
        };
        if let Some(what) = breach {
            self.breach = Some(over(self.path, what));
            return Err(std::io::Error::other("limit"));
        }
        Ok(n)
    }
}

/// `A1`-style reference -> (row, column), both 1-based.
fn cell_ref(r: &[u8]) -> Option<(u64, u64)> {
    let letters = r.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    if letters == 0 {
        return None;
    }
    let mut col = 0u64;
    for b in &r[..letters] {
        col = col
            .saturating_mul(26)
            .saturating_add(u64::from(b.to_ascii_uppercase() - b'A' + 1));
    }
    let digits = std::str::from_utf8(&r[letters..]).ok()?;
    let row = if digits.is_empty() {
        0
    } else {
        digits.parse::<u64>().unwrap_or(u64::MAX)
    };
    Some((row, col))
}

fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .map(|a| a.value.into_owned())
}

fn scan_xml<R: Read>(
    part: &mut R,
    kind: Part,
    limits: &SpreadsheetLimits,
) -> Result<(), SourceError> {
    let mut reader = quick_xml::Reader::from_reader(BufReader::new(part));
    let mut buf = Vec::new();
    let mut strings = 0u64;
    let bad = |what: String| SourceError::new(SourceErrorKind::Format, what);
    let check_ref = |r: &str| -> Result<(), SourceError> {
        for one in r.as_bytes().split(|b| *b == b':') {
            if let Some((row, col)) = cell_ref(one) {
                if col > u64::from(limits.max_columns) {
                    return Err(bad(format!(
                        "cell {} is past column {} (limit max_columns)",
                        String::from_utf8_lossy(one),
                        limits.max_columns
                    )));
                }
                if row > u64::from(limits.max_rows) {
                    return Err(bad(format!(
                        "cell {} is past row {} (limit max_rows)",
                        String::from_utf8_lossy(one),
                        limits.max_rows
                    )));
                }
            }
        }
        Ok(())
    };
    loop {
        let event = reader.read_event_into(&mut buf).map_err(|e| {
            SourceError::new(SourceErrorKind::Format, "not valid XML").with_source(e)
        })?;
        match event {
            Event::Eof => return Ok(()),
            Event::Start(e) | Event::Empty(e) => match (kind, e.local_name().as_ref()) {
                (Part::Sheet, "c" | "dimension") => {
                    if let Some(r) = attr(&e, "r").or_else(|| attr(&e, "ref")) {
                        check_ref(&r)?;
                    }
                }
                (Part::Sheet, "row") => {
                    if let Some(r) = attr(&e, "r") {
                        let row = r.parse::<u64>().unwrap_or(u64::MAX);
                        if row > u64::from(limits.max_rows) {
                            return Err(bad(format!(
                                "row {r} is past row {} (limit max_rows)",
                                limits.max_rows
                            )));
                        }
                    }
                }
                (Part::SharedStrings, "sst") => {
                    let claimed = attr(&e, "uniqueCount")
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    if claimed > limits.max_shared_strings {
                        return Err(bad(format!(
                            "its shared-strings table claims {claimed} entries, more than {} (limit max_shared_strings)",
                            limits.max_shared_strings
                        )));
                    }
                }
                (Part::SharedStrings, "si") => {
                    strings += 1;
                    if strings > limits.max_shared_strings {
                        return Err(bad(format!(
                            "its shared-strings table holds more than {} entries (limit max_shared_strings)",
                            limits.max_shared_strings
                        )));
                    }
                }
                _ => {}
            },
            _ => {}
        }
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_to_rows_and_columns() {
        assert_eq!(cell_ref(b"A1"), Some((1, 1)));
        assert_eq!(cell_ref(b"XFD1048576"), Some((1_048_576, 16_384)));
        assert_eq!(cell_ref(b"ZZZZZZ1"), Some((1, 321_272_406)));
        assert_eq!(cell_ref(b"1"), None);
    }
}
