//! Builds the source a pipeline names. One enum, so the runner stays generic over the
//! warehouse while sources are chosen by configuration at run time.

use sluice_connectors::file::{CsvOptions, CsvSource, SheetRef, SpreadsheetSource};
use sluice_connectors::sql::{SqlKind, SqlSource, SqlSourceConfig, SqlTarget, TlsMode};
use sluice_connectors::{BatchStream, HealthReport, ReadRequest, Source, SourceError, StreamInfo};

use crate::error::{PipelineError, PipelineErrorKind};
use crate::spec::{SheetSpec, SourceSpec, SqlSpec};

/// Any source a pipeline file can name.
#[derive(Debug, Clone)]
pub enum PipelineSource {
    /// `kind = "csv"`.
    Csv(CsvSource),
    /// `kind = "xlsx"`.
    Spreadsheet(SpreadsheetSource),
    /// `kind = "postgres"` or `"mysql"`.
    Sql(SqlSource),
}

fn upload_only() -> PipelineError {
    PipelineError::new(
        crate::error::PipelineErrorKind::Config,
        "this pipeline has no `path`: it reads uploaded files (POST /v1/pipelines/<name>/files)",
    )
}

impl PipelineSource {
    /// The source described by a pipeline's `[source]` table; identifiers are checked here,
    /// before any connection is made.
    pub fn from_spec(spec: &SourceSpec) -> Result<Self, PipelineError> {
        Ok(match spec {
            SourceSpec::Csv(c) => {
                let byte = |s: &Option<String>, default: u8| {
                    s.as_deref().map_or(default, |v| {
                        if v == "\\t" {
                            b'\t'
                        } else {
                            v.as_bytes().first().copied().unwrap_or(default)
                        }
                    })
                };
                PipelineSource::Csv(CsvSource::new(
                    c.path.as_deref().ok_or_else(upload_only)?,
                    CsvOptions {
                        delimiter: byte(&c.delimiter, b','),
                        quote: byte(&c.quote, b'"'),
                        has_header: c.has_header.unwrap_or(true),
                    },
                ))
            }
            SourceSpec::Xlsx(x) => {
                let sheet = match &x.sheet {
                    Some(SheetSpec::Name(n)) => SheetRef::Name(n.clone()),
                    Some(SheetSpec::Index(i)) => SheetRef::Index(*i),
                    None => SheetRef::Index(0),
                };
                PipelineSource::Spreadsheet(SpreadsheetSource::new(
                    x.path.as_deref().ok_or_else(upload_only)?,
                    sheet,
                    x.header_row.unwrap_or(1),
                ))
            }
            SourceSpec::Postgres(q) => PipelineSource::Sql(sql_source(SqlKind::Postgres, q)?),
            SourceSpec::Mysql(q) => PipelineSource::Sql(sql_source(SqlKind::Mysql, q)?),
        })
    }
}

fn sql_source(kind: SqlKind, spec: &SqlSpec) -> Result<SqlSource, PipelineError> {
    let config = |m: String| PipelineError::new(PipelineErrorKind::Config, m);
    let target = match (&spec.table, &spec.query) {
        (Some(t), None) => SqlTarget::table(t),
        (None, Some(q)) => SqlTarget::query(q),
        _ => {
            return Err(config(
                "[source] give exactly one of `table` or `query`".into(),
            ));
        }
    }
    .map_err(|e| config(format!("[source] {}", e.message())))?;
    let tls = match spec.tls.as_deref() {
        None => None,
        Some("disable") => Some(TlsMode::Disable),
        Some("prefer") => Some(TlsMode::Prefer),
        Some("require") => Some(TlsMode::Require),
        Some(other) => {
            return Err(config(format!(
                "[source] tls {other:?}: use disable, prefer or require"
            )));
        }
    };
    SqlSource::new(SqlSourceConfig {
        kind,
        url: spec.url.clone(),
        password: spec.password.clone(),
        target,
        cursor: spec.cursor.clone(),
        tls,
    })
    .map_err(|e| config(format!("[source] {}", e.message())))
}

impl Source for PipelineSource {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        match self {
            PipelineSource::Csv(s) => s.streams().await,
            PipelineSource::Spreadsheet(s) => s.streams().await,
            PipelineSource::Sql(s) => s.streams().await,
        }
    }

    async fn check(&self) -> Result<HealthReport, SourceError> {
        match self {
            PipelineSource::Csv(s) => s.check().await,
            PipelineSource::Spreadsheet(s) => s.check().await,
            PipelineSource::Sql(s) => s.check().await,
        }
    }

    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        match self {
            PipelineSource::Csv(s) => s.read(request).await,
            PipelineSource::Spreadsheet(s) => s.read(request).await,
            PipelineSource::Sql(s) => s.read(request).await,
        }
    }
}
