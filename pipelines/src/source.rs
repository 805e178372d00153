//! Builds the source a pipeline names. One enum, so the runner stays generic over the
//! warehouse while sources are chosen by configuration at run time.

use std::sync::Arc;

use sluice_connectors::file::{CsvOptions, CsvSource, SheetRef, SpreadsheetSource};
use sluice_connectors::saas::odoo::{OdooConfig, OdooSource, OdooStream, Transport};
use sluice_connectors::saas::quickbooks::{
    QboStream, QuickBooksConfig, QuickBooksSource, SANDBOX_URL,
};
use sluice_connectors::saas::{MemoryTokens, TokenStore};
use sluice_connectors::sql::{SqlKind, SqlSource, SqlSourceConfig, SqlTarget, TlsMode};
use sluice_connectors::{BatchStream, HealthReport, ReadRequest, Source, SourceError, StreamInfo};

use crate::confine::SourceReach;
use crate::error::{PipelineError, PipelineErrorKind};
use crate::spec::{OdooSpec, QuickbooksSpec, SheetSpec, SourceSpec, SqlSpec};

/// Any source a pipeline file can name.
#[derive(Debug, Clone)]
pub enum PipelineSource {
    /// `kind = "csv"`.
    Csv(CsvSource),
    /// `kind = "xlsx"`.
    Spreadsheet(SpreadsheetSource),
    /// `kind = "postgres"` or `"mysql"`.
    Sql(SqlSource),
    /// `kind = "quickbooks"`.
    QuickBooks(QuickBooksSource),
    /// `kind = "odoo"`.
    Odoo(OdooSource),
}

fn upload_only() -> PipelineError {
    PipelineError::new(
        crate::error::PipelineErrorKind::Config,
        "this pipeline has no `path`: it reads uploaded files (POST /v1/pipelines/<name>/files)",
    )
}

impl PipelineSource {
    /// The source described by a pipeline's `[source]` table; identifiers are checked here,
    /// before any connection is made. `tokens` keeps credentials a service rotates
    /// (QuickBooks refresh tokens); without it they are kept in memory only, which is
    /// right only for a source that will not be used again.
    ///
    /// `reach` confines its files and hosts (see [`crate::confine`]).
    pub fn from_spec(
        spec: &SourceSpec,
        tokens: Option<Arc<dyn TokenStore>>,
        reach: &SourceReach,
    ) -> Result<Self, PipelineError> {
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
                    &reach.file(c.path.as_deref().ok_or_else(upload_only)?)?,
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
                    &reach.file(x.path.as_deref().ok_or_else(upload_only)?)?,
                    sheet,
                    x.header_row.unwrap_or(1),
                ))
            }
            SourceSpec::Postgres(q) => {
                PipelineSource::Sql(sql_source(SqlKind::Postgres, q, reach)?)
            }
            SourceSpec::Mysql(q) => PipelineSource::Sql(sql_source(SqlKind::Mysql, q, reach)?),
            SourceSpec::Quickbooks(q) => PipelineSource::QuickBooks(quickbooks_source(
                q,
                tokens.unwrap_or_else(|| Arc::new(MemoryTokens::default())),
                reach,
            )?),
            SourceSpec::Odoo(o) => PipelineSource::Odoo(odoo_source(o, reach)?),
        })
    }

    /// The source of a pipeline whose rotated credentials are kept with the pipeline in
    /// `store` (see [`crate::token_store`]).
    pub fn for_pipeline<S: sluice_engine::control::PipelineStore + 'static>(
        spec: &crate::spec::PipelineSpec,
        store: Arc<S>,
        reach: &SourceReach,
    ) -> Result<Self, PipelineError> {
        let tokens: Option<Arc<dyn TokenStore>> = match &spec.source {
            SourceSpec::Quickbooks(q) => Some(Arc::new(crate::token_store::StoredTokens::new(
                store,
                spec,
                &format!("{}/{}", q.realm_id, q.client_id),
                &q.refresh_token,
            ))),
            _ => None,
        };
        PipelineSource::from_spec(&spec.source, tokens, reach)
    }

    /// The same source for a health read: it does not spend credentials (a QuickBooks
    /// check does not refresh the access token).
    pub fn for_health_read(self) -> Self {
        match self {
            PipelineSource::QuickBooks(s) => {
                PipelineSource::QuickBooks(s.without_credential_check())
            }
            other => other,
        }
    }

    /// The canonical entity an API source's stream yields.
    pub fn api_entity(&self) -> Option<&'static str> {
        match self {
            PipelineSource::QuickBooks(s) => Some(s.stream().entity()),
            PipelineSource::Odoo(s) => s.stream().entity().ok(),
            _ => None,
        }
    }
}

fn source_config(e: SourceError) -> PipelineError {
    PipelineError::config("[source]").with_source(e)
}

fn quickbooks_source(
    spec: &QuickbooksSpec,
    tokens: Arc<dyn TokenStore>,
    reach: &SourceReach,
) -> Result<QuickBooksSource, PipelineError> {
    let stream = QboStream::parse(&spec.stream).map_err(source_config)?;
    let mut config = QuickBooksConfig::new(
        &spec.realm_id,
        &spec.client_id,
        &spec.client_secret,
        &spec.refresh_token,
        stream,
    );
    match spec.base_url.as_deref() {
        None | Some("production") => {}
        Some("sandbox") => config.base_url = SANDBOX_URL.to_string(),
        Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
            config.base_url = url.to_string();
        }
        Some(other) => {
            return Err(PipelineError::new(
                PipelineErrorKind::Config,
                format!("[source] base_url {other:?}: use \"production\", \"sandbox\" or a URL"),
            ));
        }
    }
    if let Some(url) = &spec.token_url {
        config.token_url = url.clone();
    }
    if let Some(n) = spec.page_size {
        config.page_size = n;
    }
    config.egress = reach.egress().clone();
    QuickBooksSource::new(config, tokens).map_err(source_config)
}

fn odoo_source(spec: &OdooSpec, reach: &SourceReach) -> Result<OdooSource, PipelineError> {
    let transport = match spec.transport.as_deref() {
        None | Some("jsonrpc") => Transport::JsonRpc,
        Some("json2") => Transport::Json2,
        Some(other) => {
            return Err(PipelineError::new(
                PipelineErrorKind::Config,
                format!("[source] transport {other:?}: use \"jsonrpc\" or \"json2\""),
            ));
        }
    };
    OdooSource::new(OdooConfig {
        url: spec.url.clone(),
        db: spec.db.clone(),
        login: spec.login.clone(),
        api_key: spec.api_key.clone(),
        stream: OdooStream::parse(&spec.stream).map_err(source_config)?,
        transport,
        page_size: spec.page_size.unwrap_or(500),
        retry: Default::default(),
        egress: reach.egress().clone(),
        request_timeout: std::time::Duration::from_secs(
            spec.request_timeout_secs.unwrap_or(120).clamp(1, 600),
        ),
    })
    .map_err(source_config)
}

fn sql_source(
    kind: SqlKind,
    spec: &SqlSpec,
    reach: &SourceReach,
) -> Result<SqlSource, PipelineError> {
    let target = match (&spec.table, &spec.query) {
        (Some(t), None) => SqlTarget::table(t),
        (None, Some(q)) => SqlTarget::query(q),
        _ => {
            return Err(PipelineError::config(
                "[source] give exactly one of `table` or `query`",
            ));
        }
    }
    .map_err(source_config)?;
    let tls = match spec.tls.as_deref() {
        None => None,
        Some("disable") => Some(TlsMode::Disable),
        Some("prefer") => Some(TlsMode::Prefer),
        Some("require") => Some(TlsMode::Require),
        Some(other) => {
            return Err(PipelineError::config(format!(
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
        egress: reach.egress().clone(),
        timeouts: spec.timeouts(),
    })
    .map_err(source_config)
}

impl Source for PipelineSource {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        match self {
            PipelineSource::Csv(s) => s.streams().await,
            PipelineSource::Spreadsheet(s) => s.streams().await,
            PipelineSource::Sql(s) => s.streams().await,
            PipelineSource::QuickBooks(s) => s.streams().await,
            PipelineSource::Odoo(s) => s.streams().await,
        }
    }

    async fn check(&self) -> Result<HealthReport, SourceError> {
        match self {
            PipelineSource::Csv(s) => s.check().await,
            PipelineSource::Spreadsheet(s) => s.check().await,
            PipelineSource::Sql(s) => s.check().await,
            PipelineSource::QuickBooks(s) => s.check().await,
            PipelineSource::Odoo(s) => s.check().await,
        }
    }

    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        match self {
            PipelineSource::Csv(s) => s.read(request).await,
            PipelineSource::Spreadsheet(s) => s.read(request).await,
            PipelineSource::Sql(s) => s.read(request).await,
            PipelineSource::QuickBooks(s) => s.read(request).await,
            PipelineSource::Odoo(s) => s.read(request).await,
        }
    }
}
