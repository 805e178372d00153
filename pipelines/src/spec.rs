//! Pipeline definitions: the TOML file a user writes (and, later, the same fields as JSON
//! through the API). Unknown keys are errors, so a typo never silently changes behaviour.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::FixedOffset;
use serde::{Deserialize, Serialize};
use sluice_engine::Entity;
use sluice_engine::money::DecimalFormat;
use sluice_engine::time::TimeFormat;
use sluice_engine::validate::RuleOverrides;

use crate::error::PipelineError;

/// A pipeline: where rows come from, what they become, which tenant they belong to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Unique per tenant; also the `source` of every row the pipeline loads.
    pub name: String,
    /// The tenant's slug.
    pub tenant: String,
    /// What the rows are.
    pub entity: Entity,
    /// Where they come from.
    pub source: SourceSpec,
    /// Canonical field -> source column; unlisted fields map by the same name.
    #[serde(default)]
    pub mapping: BTreeMap<String, String>,
    /// How the source writes dates and numbers.
    #[serde(default)]
    pub format: FormatSpec,
    /// Adjustments to the built-in rules.
    #[serde(default)]
    pub rules: RuleOverrides,
    /// When cron runs it.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// Records per batch (default 8192); each batch commits on its own.
    #[serde(default)]
    pub batch_rows: Option<usize>,
}

/// The `[source]` table, by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceSpec {
    /// A CSV file.
    Csv(CsvSpec),
    /// A spreadsheet (xlsx, xls, xlsb, ods).
    Xlsx(SpreadsheetSpec),
    /// A PostgreSQL table or query.
    Postgres(SqlSpec),
    /// A MySQL or MariaDB table or query.
    Mysql(SqlSpec),
    /// A QuickBooks Online company.
    Quickbooks(QuickbooksSpec),
    /// An Odoo database.
    Odoo(OdooSpec),
}

/// `kind = "quickbooks"`. `client_secret` and `refresh_token` are secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuickbooksSpec {
    /// The company id.
    pub realm_id: String,
    /// The app's OAuth client id.
    pub client_id: String,
    /// The app's OAuth client secret.
    pub client_secret: String,
    /// The refresh token the company was connected with. QuickBooks rotates it; sluice
    /// keeps the newest (encrypted) in the control store and uses that until this value
    /// changes (a reconnection).
    pub refresh_token: String,
    /// The entity read: Invoice, CreditMemo, Bill, VendorCredit, Payment, BillPayment,
    /// Customer, Vendor or Account.
    pub stream: String,
    /// `"production"` (default), `"sandbox"`, or a URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The OAuth token endpoint; Intuit's by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// Records per query page, at most 1000 (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
}

impl std::fmt::Debug for QuickbooksSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuickbooksSpec")
            .field("realm_id", &self.realm_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("stream", &self.stream)
            .field("base_url", &self.base_url)
            .field("token_url", &self.token_url)
            .finish()
    }
}

/// `kind = "odoo"`. `api_key` is a secret.
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OdooSpec {
    /// The server, e.g. `https://acme.odoo.com`.
    pub url: String,
    /// The database.
    pub db: String,
    /// The user's login.
    pub login: String,
    /// The user's API key.
    pub api_key: String,
    /// `invoices`, `bills`, `payments`, `customers`, `vendors`, `accounts`, or
    /// `account.move:<move_type>`.
    pub stream: String,
    /// `"jsonrpc"` (default) or `"json2"` (Odoo 19's JSON-2 API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Records per page (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    /// Seconds one request may take, answer included (default 120, 1 to 600); past it
    /// the request is retried like a 5xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_secs: Option<u64>,
}

impl std::fmt::Debug for OdooSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdooSpec")
            .field("url", &self.url)
            .field("db", &self.db)
            .field("login", &self.login)
            .field("api_key", &"<redacted>")
            .field("stream", &self.stream)
            .field("transport", &self.transport)
            .finish()
    }
}

impl SourceSpec {
    /// Points a file pipeline at `path` (an uploaded file); refused for database sources.
    pub fn read_file(&mut self, path: PathBuf) -> Result<(), PipelineError> {
        match self {
            SourceSpec::Csv(c) => c.path = Some(path),
            SourceSpec::Xlsx(x) => x.path = Some(path),
            SourceSpec::Postgres(_)
            | SourceSpec::Mysql(_)
            | SourceSpec::Quickbooks(_)
            | SourceSpec::Odoo(_) => {
                return Err(PipelineError::config(
                    "only csv and xlsx pipelines take files",
                ));
            }
        }
        Ok(())
    }

    /// The kind of file the source reads, if it reads files.
    pub fn file_kind(&self) -> Option<&'static str> {
        match self {
            SourceSpec::Csv(_) => Some("csv"),
            SourceSpec::Xlsx(_) => Some("xlsx"),
            SourceSpec::Postgres(_)
            | SourceSpec::Mysql(_)
            | SourceSpec::Quickbooks(_)
            | SourceSpec::Odoo(_) => None,
        }
    }
}

/// `kind = "postgres"` / `kind = "mysql"`.
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlSpec {
    /// Connection URL, e.g. `postgres://erp@db:5432/erp` (the password may be in it).
    pub url: String,
    /// The password, kept apart from the URL (a secret: never logged or shown).
    #[serde(default)]
    pub password: Option<String>,
    /// `name` or `schema.name`; or give `query`.
    #[serde(default)]
    pub table: Option<String>,
    /// A read-only `SELECT` (or `WITH ... SELECT`); or give `table`.
    #[serde(default)]
    pub query: Option<String>,
    /// One or two cursor columns, e.g. `["updated_at", "id"]`; absent: full refresh.
    #[serde(default)]
    pub cursor: Vec<String>,
    /// `disable`, `prefer` or `require`; default: whatever the URL says.
    #[serde(default)]
    pub tls: Option<String>,
    /// A column that marks deleted rows: a timestamp (`deleted_at`) or a boolean
    /// (`is_deleted`). Deleted rows stay in the warehouse, marked, and drop out of every
    /// aggregate. Give it a cursor so that a deletion (which should bump `updated_at`) is read.
    #[serde(default)]
    pub soft_delete: Option<String>,
    /// Seconds any one statement may run (default 1800, at most 86400); past it the run
    /// fails and is retried. A connection that answers nothing for that long and 5 s more
    /// has stalled: the attempt fails as transient and is retried too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_timeout_secs: Option<u64>,
}

impl SqlSpec {
    /// The source's timeouts.
    pub fn timeouts(&self) -> sluice_connectors::sql::SqlTimeouts {
        let mut t = sluice_connectors::sql::SqlTimeouts::default();
        if let Some(s) = self.statement_timeout_secs {
            t.statement = std::time::Duration::from_secs(s.clamp(1, MAX_STATEMENT_SECS));
        }
        t
    }
}

/// The longest statement timeout a pipeline may ask for.
pub const MAX_STATEMENT_SECS: u64 = 86_400;

impl std::fmt::Debug for SqlSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSpec")
            .field("url", &sluice_connectors::sql::redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("table", &self.table)
            .field("query", &self.query)
            .field("cursor", &self.cursor)
            .field("tls", &self.tls)
            .field("soft_delete", &self.soft_delete)
            .field("statement_timeout_secs", &self.statement_timeout_secs)
            .finish()
    }
}

/// `kind = "csv"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CsvSpec {
    /// The file, relative to the pipeline file; absent for a pipeline that only reads
    /// uploaded files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// One character; default `,`. `"\t"` for tab-separated files.
    #[serde(default)]
    pub delimiter: Option<String>,
    /// One character; default `"`.
    #[serde(default)]
    pub quote: Option<String>,
    /// Whether the first line names the columns; default true.
    #[serde(default)]
    pub has_header: Option<bool>,
}

/// `kind = "xlsx"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpreadsheetSpec {
    /// The file, relative to the pipeline file; absent for a pipeline that only reads
    /// uploaded files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// Sheet name, or its 0-based index; default the first sheet.
    #[serde(default)]
    pub sheet: Option<SheetSpec>,
    /// The row with the column names, 1-based; default 1.
    #[serde(default)]
    pub header_row: Option<u32>,
}

/// A sheet by name or by index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SheetSpec {
    /// `sheet = "Bills"`.
    Name(String),
    /// `sheet = 0`.
    Index(usize),
}

/// `[format]`: how the source writes values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FormatSpec {
    /// strftime formats for dates tried after ISO 8601, e.g. `["%d/%m/%Y"]`.
    #[serde(default)]
    pub date_formats: Vec<String>,
    /// strftime formats for timestamps tried after RFC 3339.
    #[serde(default)]
    pub timestamp_formats: Vec<String>,
    /// `"."` (default) or `","`.
    #[serde(default)]
    pub decimal_separator: Option<String>,
    /// Digit-group separator; default `","` with a `.` decimal mark, `"."` with `,`; `""`
    /// for none.
    #[serde(default)]
    pub thousands_separator: Option<String>,
    /// UTC offset of local times that carry none, e.g. `"+02:00"`; default UTC.
    #[serde(default)]
    pub utc_offset: Option<String>,
}

/// `[schedule]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Six-field cron expression (seconds first), e.g. `"0 */15 * * * *"`.
    pub cron: String,
}

impl ScheduleSpec {
    /// The parsed schedule of a stored pipeline definition (its JSON form), if it has a
    /// valid one.
    pub fn of_stored(spec: &serde_json::Value) -> Option<croner::Cron> {
        let cron = spec["schedule"]["cron"].as_str()?;
        ScheduleSpec {
            cron: cron.to_string(),
        }
        .parse()
        .ok()
    }

    /// The parsed expression: six fields (seconds first) or the classic five (minutes
    /// first, at second 0); times are UTC.
    pub fn parse(&self) -> Result<croner::Cron, PipelineError> {
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(&self.cron)
            .map_err(|e| {
                PipelineError::config(format!("[schedule] cron '{}'", self.cron)).with_source(e)
            })
    }
}

/// Default records per batch.
pub const DEFAULT_BATCH_ROWS: usize = 8192;

/// The most records a batch may hold.
pub const MAX_BATCH_ROWS: usize = 100_000;

impl PipelineSpec {
    /// The source's soft-delete column, if it has one.
    pub fn soft_delete_column(&self) -> Option<&str> {
        match &self.source {
            SourceSpec::Postgres(q) | SourceSpec::Mysql(q) => q.soft_delete.as_deref(),
            SourceSpec::Csv(_)
            | SourceSpec::Xlsx(_)
            | SourceSpec::Quickbooks(_)
            | SourceSpec::Odoo(_) => None,
        }
    }

    /// Records per batch.
    pub fn batch_rows(&self) -> usize {
        self.batch_rows.unwrap_or(DEFAULT_BATCH_ROWS)
    }

    /// The number format declared in `[format]`.
    pub fn decimal_format(&self) -> Result<DecimalFormat, PipelineError> {
        let decimal = match self.format.decimal_separator.as_deref() {
            None | Some(".") => b'.',
            Some(",") => b',',
            Some(other) => {
                return Err(PipelineError::config(format!(
                    "[format] decimal_separator must be \".\" or \",\", not {other:?}"
                )));
            }
        };
        let thousands = match self.format.thousands_separator.as_deref() {
            None => Some(if decimal == b'.' { b',' } else { b'.' }),
            Some("") => None,
            Some(s)
                if s.len() == 1
                    && matches!(s, "," | "." | "'" | " " | "_")
                    && s.as_bytes()[0] != decimal =>
            {
                Some(s.as_bytes()[0])
            }
            Some(other) => {
                return Err(PipelineError::config(format!(
                    "[format] thousands_separator {other:?} must be one of , . ' space _ (and differ from the decimal mark), or \"\" for none"
                )));
            }
        };
        Ok(DecimalFormat {
            decimal_separator: decimal,
            thousands_separator: thousands,
        })
    }

    /// The date/time formats declared in `[format]`.
    pub fn time_format(&self) -> Result<TimeFormat, PipelineError> {
        let source_offset = match &self.format.utc_offset {
            None => None,
            Some(s) => Some(parse_offset(s).ok_or_else(|| {
                PipelineError::config(format!(
                    "[format] utc_offset {s:?} is not an offset like \"+02:00\" or \"-05:30\""
                ))
            })?),
        };
        Ok(TimeFormat {
            date_formats: self.format.date_formats.clone(),
            timestamp_formats: self.format.timestamp_formats.clone(),
            source_offset,
        })
    }
}

fn parse_offset(s: &str) -> Option<FixedOffset> {
    if s == "Z" || s == "UTC" {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let secs = h.parse::<i32>().ok()? * 3600 + m.parse::<i32>().ok()? * 60;
    FixedOffset::east_opt(sign * secs)
}

/// Pipeline names: `[a-z0-9][a-z0-9_.-]{0,63}`. They reach file names, SQL values and URLs.
pub fn check_pipeline_name(name: &str) -> Result<(), PipelineError> {
    let b = name.as_bytes();
    let ok = (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(PipelineError::config(format!(
            "invalid pipeline name {name:?}: use 1-64 lower-case letters, digits, '_', '-' or '.', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name = \"p\"\ntenant = \"acme\"\nentity = \"bills\"\n[source]\nkind = \"xlsx\"\npath = \"b.xlsx\"\nsheet = 2\n";

    #[test]
    fn minimal_file_gets_defaults() {
        let spec = PipelineSpec::from_toml(MINIMAL).expect("valid");
        assert_eq!(spec.batch_rows(), DEFAULT_BATCH_ROWS);
        assert_eq!(
            spec.decimal_format().expect("fmt"),
            DecimalFormat::default()
        );
        assert!(matches!(
            spec.source,
            SourceSpec::Xlsx(SpreadsheetSpec {
                sheet: Some(SheetSpec::Index(2)),
                ..
            })
        ));
    }

    #[test]
    fn api_sources_parse_and_their_stream_must_match_the_entity() {
        let qbo = "name = \"q\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"quickbooks\"\nrealm_id = \"4620816365\"\nclient_id = \"c\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\nstream = \"CreditMemo\"\n";
        let spec = PipelineSpec::from_toml(qbo).expect("valid");
        assert!(!format!("{spec:?}").contains("client_secret: \"s\""));
        let err = PipelineSpec::from_toml(&qbo.replace("CreditMemo", "BillPayment"))
            .expect_err("payments are not invoices");
        assert!(err.message().contains("stream of payments"), "{err}");
        assert!(PipelineSpec::from_toml(&qbo.replace("CreditMemo", "Estimate")).is_err());
        let odoo = "name = \"o\"\ntenant = \"acme\"\nentity = \"bills\"\n[source]\nkind = \"odoo\"\nurl = \"http://odoo\"\ndb = \"acme\"\nlogin = \"admin\"\napi_key = \"k\"\nstream = \"account.move:in_refund\"\n";
        PipelineSpec::from_toml(odoo).expect("valid");
        assert!(PipelineSpec::from_toml(&odoo.replace("in_refund", "out_refund")).is_err());
        let text = MINIMAL.replace("kind = \"xlsx\"", "kind = \"ftp\"");
        assert!(PipelineSpec::from_toml(&text).is_err());
    }

    #[test]
    fn names_that_could_reach_sql_or_paths_are_rejected() {
        for bad in ["", "Acme", "a b", "x;drop table", "../etc", "a'b"] {
            assert!(check_pipeline_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_pipeline_name("acme-invoices.v2").is_ok());
    }

    #[test]
    fn formats_are_checked() {
        let with = |extra: &str| PipelineSpec::from_toml(&format!("{MINIMAL}[format]\n{extra}\n"));
        assert!(with("decimal_separator = \";\"").is_err());
        assert!(with("decimal_separator = \",\"\nthousands_separator = \",\"").is_err());
        assert!(with("utc_offset = \"CET\"").is_err());
        let spec = with("utc_offset = \"-05:30\"").expect("valid");
        assert_eq!(
            spec.time_format().expect("tf").source_offset,
            FixedOffset::west_opt(5 * 3600 + 1800)
        );
    }
}
