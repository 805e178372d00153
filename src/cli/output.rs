//! `--format text|json|csv|xlsx` (and `--json`) of the reports and lists that export as
//! tables: CSV or an XLSX workbook on stdout, amounts as numbers with their currency.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use sluice_api::export::{Table, to_csv, to_xlsx};
use std::io::{IsTerminal, Write};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum OutputFormat {
    /// Aligned columns for reading.
    Text,
    /// JSON.
    Json,
    /// CSV: exact decimal amounts, each row with its currency.
    Csv,
    /// An XLSX workbook (redirect stdout to a file): amounts as numbers formatted with
    /// their currency code, dates as dates.
    Xlsx,
}

#[derive(Args)]
pub(super) struct OutputArgs {
    /// Print JSON (same as --format json).
    #[arg(long)]
    json: bool,
    /// text (default), json, csv or xlsx.
    #[arg(long, value_enum, conflicts_with = "json")]
    format: Option<OutputFormat>,
}

impl OutputArgs {
    pub(super) fn format(&self) -> OutputFormat {
        match (self.json, self.format) {
            (true, _) => OutputFormat::Json,
            (false, Some(f)) => f,
            (false, None) => OutputFormat::Text,
        }
    }

    pub(super) fn is_json(&self) -> bool {
        self.format() == OutputFormat::Json
    }

    /// Writes the table when CSV or XLSX was asked for, and says whether it did.
    pub(super) fn table(&self, table: impl FnOnce() -> Table) -> Result<bool> {
        let bytes = match self.format() {
            OutputFormat::Csv => to_csv(&table()),
            OutputFormat::Xlsx => {
                if std::io::stdout().is_terminal() {
                    bail!(
                        "an XLSX workbook is binary: redirect stdout to a file (… --format xlsx > report.xlsx)"
                    );
                }
                to_xlsx(&table())?
            }
            OutputFormat::Text | OutputFormat::Json => return Ok(false),
        };
        let mut out = std::io::stdout().lock();
        out.write_all(&bytes)?;
        out.flush()?;
        Ok(true)
    }
}
