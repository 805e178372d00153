//! SQL sources: a PostgreSQL or MySQL/MariaDB table or read-only query, read incrementally
//! by a cursor of one or two columns (e.g. `updated_at, id`) with keyset paging, each page
//! in its own read-only transaction with a consistent snapshot; or read whole (full
//! refresh) in one read-only transaction, streamed. Rows become typed Arrow columns.
//!
//! Never: build SQL from an identifier that is not a plain name checked before any query
//! and found in the catalog; use OFFSET; hold more than a page in memory.

mod mysql;
mod postgres;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::egress::EgressPolicy;
use crate::error::{SourceError, SourceErrorKind};
use crate::source::{
    BatchStream, HealthReport, ReadRequest, Source, SourceBatch, StreamInfo, SyncMode,
};

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlKind {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

/// What to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlTarget {
    /// A table, optionally schema-qualified.
    Table {
        /// Schema (PostgreSQL) or database (MySQL); the connection's default when absent.
        schema: Option<String>,
        /// Table name.
        name: String,
    },
    /// A read-only query (`SELECT ...` or `WITH ...`), used as a subquery.
    Query(String),
}

/// TLS for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it.
    Prefer,
    /// TLS or fail.
    Require,
}

/// A SQL source's settings. `Debug` never shows the password.
#[derive(Clone)]
pub struct SqlSourceConfig {
    /// The database.
    pub kind: SqlKind,
    /// Connection URL (may carry the password).
    pub url: String,
    /// The password, when kept apart from the URL as a secret.
    pub password: Option<String>,
    /// Table or query.
    pub target: SqlTarget,
    /// Cursor columns (one or two); empty for a full refresh.
    pub cursor: Vec<String>,
    /// TLS override; the URL's own settings otherwise.
    pub tls: Option<TlsMode>,
    /// Which hosts the connection may reach.
    pub egress: EgressPolicy,
    /// How long connecting and each statement may take.
    pub timeouts: SqlTimeouts,
}

/// How long a SQL source may wait. A query that never answers (`pg_sleep(1e9)`, a lock
/// wait) fails its run instead of pinning a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlTimeouts {
    /// Connecting, TLS and authentication included.
    pub connect: Duration,
    /// Any one statement (a page of the keyset read, a catalog query).
    pub statement: Duration,
}

impl SqlTimeouts {
    /// The longest a single wait on the server may last: the statement timeout and
    /// [`STALL_GRACE`].
    pub fn stall_limit(&self) -> Duration {
        self.statement + STALL_GRACE
    }
}

impl Default for SqlTimeouts {
    fn default() -> Self {
        SqlTimeouts {
            connect: Duration::from_secs(10),
            statement: Duration::from_secs(1800),
        }
    }
}

/// The host and port a connection will reach, checked against `egress` and pinned to the
/// resolved address that passed, so the driver cannot resolve the name again to
/// somewhere else. A Unix socket passes only an unrestricted policy.
pub(crate) async fn pinned_address(
    egress: &EgressPolicy,
    host: &str,
    port: u16,
    socket: Option<&std::path::Path>,
) -> Result<Option<std::net::SocketAddr>, SourceError> {
    if egress.is_unrestricted() {
        return Ok(None);
    }
    if let Some(path) = socket {
        egress.check_host(&path.display().to_string())?;
        return Ok(None);
    }
    egress.check_host(host)?;
    let addrs = egress.resolve(host, port).await?;
    Ok(addrs.first().copied())
}

/// Runs `connect` under the connect timeout.
pub(crate) async fn within_connect_timeout<T>(
    timeouts: SqlTimeouts,
    url: &str,
    connect: impl Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(timeouts.connect, connect)
        .await
        .unwrap_or_else(|_| {
            Err(SourceError::new(
                SourceErrorKind::Transient,
                format!(
                    "connecting to {} took longer than {} s",
                    redact_url(url),
                    timeouts.connect.as_secs()
                ),
            ))
        })
}

impl fmt::Debug for SqlSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlSourceConfig")
            .field("kind", &self.kind)
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("target", &self.target)
            .field("cursor", &self.cursor)
            .field("tls", &self.tls)
            .field("egress", &self.egress)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

/// Whether a URL query parameter carries a secret (`password`, `sslpassword`, ...).
fn secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n == "pass" || n == "pwd"
}

/// The URL without any password: the userinfo's and every password-like query parameter
/// (`?password=`, `sslpassword=`) removed. For messages, and for the stored copy of a
/// URL that may be shown.
pub fn redact_url(url: &str) -> String {
    let (rest, fragment) = match url.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (url, None),
    };
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &base[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &base[..s + 3], user, &base[at + 1..])
        }
        _ => base.to_string(),
    };
    if let Some(q) = query {
        let kept: Vec<&str> = q
            .split('&')
            .filter(|pair| !secret_param(pair.split('=').next().unwrap_or("")))
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Where a connection URL sends its password: host (or socket), port, user and
/// database, with the query's overrides (`?host=`, `?port=`, `?user=`, `?dbname=`)
/// applied. A stored password stays with a pipeline only while this is unchanged.
pub fn destination(url: &str) -> Option<[String; 4]> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let mut host = parsed.host_str().unwrap_or("").to_ascii_lowercase();
    let mut port = parsed.port().map(|p| p.to_string()).unwrap_or_default();
    let mut user = parsed.username().to_string();
    let mut db = parsed.path().trim_start_matches('/').to_string();
    for (k, v) in parsed.query_pairs() {
        match k.to_ascii_lowercase().as_str() {
            "host" | "hostaddr" | "socket" => host = v.to_ascii_lowercase(),
            "port" => port = v.to_string(),
            "user" | "username" => user = v.to_string(),
            "dbname" | "database" => db = v.to_string(),
            _ => {}
        }
    }
    Some([host, port, user, db])
}

/// A plain SQL identifier: letters, digits, `_`, not starting with a digit, at most 63
/// characters. Anything else (quotes, spaces, `;`, comments) is refused before any query.
pub fn check_identifier(what: &str, name: &str) -> Result<(), SourceError> {
    let b = name.as_bytes();
    let ok = (1..=63).contains(&b.len())
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(SourceError::new(
            SourceErrorKind::Config,
            format!(
                "{what} {name:?} is not a plain identifier (letters, digits and _ only); nothing was queried"
            ),
        ))
    }
}

impl SqlTarget {
    /// Parses `name` or `schema.name`, checking both parts.
    pub fn table(spec: &str) -> Result<Self, SourceError> {
        let parts: Vec<&str> = spec.split('.').collect();
        match parts.as_slice() {
            [name] => {
                check_identifier("table", name)?;
                Ok(SqlTarget::Table {
                    schema: None,
                    name: name.to_string(),
                })
            }
            [schema, name] => {
                check_identifier("schema", schema)?;
                check_identifier("table", name)?;
                Ok(SqlTarget::Table {
                    schema: Some(schema.to_string()),
                    name: name.to_string(),
                })
            }
            _ => Err(SourceError::new(
                SourceErrorKind::Config,
                format!("table {spec:?} must be `name` or `schema.name`"),
            )),
        }
    }

    /// A read-only query; refuses statements that are not a single SELECT/WITH.
    pub fn query(sql: &str) -> Result<Self, SourceError> {
        let trimmed = sql.trim().trim_end_matches(';').trim();
        let head = trimmed
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if !(head == "select" || head == "with") || trimmed.contains(';') {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                "query must be a single SELECT (or WITH ... SELECT) statement",
            ));
        }
        Ok(SqlTarget::Query(trimmed.to_string()))
    }
}

/// How a source column's values are read and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColType {
    /// Integers, as i64.
    Int,
    /// Exact decimals with a fixed scale (Decimal128(38, scale)).
    Decimal(i8),
    /// Text, and numerics without a declared scale (their exact decimal text).
    Text,
    /// JSON documents, as text.
    Json,
    /// UUIDs, as text.
    Uuid,
    /// Dates.
    Date,
    /// Timestamps without a zone (taken as UTC).
    Timestamp,
    /// Timestamps with a zone (converted to UTC).
    TimestampTz,
    /// Booleans.
    Bool,
}

impl ColType {
    fn arrow(self) -> DataType {
        match self {
            ColType::Int => DataType::Int64,
            ColType::Decimal(s) => DataType::Decimal128(38, s),
            ColType::Text | ColType::Json | ColType::Uuid => DataType::Utf8,
            ColType::Date => DataType::Date32,
            ColType::Timestamp | ColType::TimestampTz => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            ColType::Bool => DataType::Boolean,
        }
    }
}

/// One column of the stream.
#[derive(Debug, Clone)]
pub(crate) struct SqlColumn {
    pub(crate) name: String,
    pub(crate) ty: ColType,
    pub(crate) nullable: bool,
}

/// One decoded cell.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Decimal(Decimal),
    Text(String),
    Date(NaiveDate),
    Instant(DateTime<Utc>),
    Bool(bool),
}

impl Cell {
    fn to_json(&self) -> Value {
        match self {
            Cell::Null => Value::Null,
            Cell::Int(i) => json!(i),
            Cell::Decimal(d) => json!(d.to_string()),
            Cell::Text(t) => json!(t),
            Cell::Date(d) => json!(d.to_string()),
            Cell::Instant(t) => json!(t.timestamp_micros()),
            Cell::Bool(b) => json!(b),
        }
    }

    fn from_json(value: &Value, ty: ColType) -> Option<Cell> {
        Some(match ty {
            ColType::Int => Cell::Int(value.as_i64()?),
            ColType::Decimal(_) => Cell::Decimal(value.as_str()?.parse().ok()?),
            ColType::Text | ColType::Json | ColType::Uuid => {
                Cell::Text(value.as_str()?.to_string())
            }
            ColType::Date => Cell::Date(value.as_str()?.parse().ok()?),
            ColType::Timestamp | ColType::TimestampTz => {
                Cell::Instant(DateTime::from_timestamp_micros(value.as_i64()?)?)
            }
            ColType::Bool => Cell::Bool(value.as_bool()?),
        })
    }
}

/// Rows of one page, column by column, into an Arrow batch.
pub(crate) struct ColumnsBuilder {
    schema: SchemaRef,
    columns: Vec<(ColType, Builder)>,
}

enum Builder {
    Int(Int64Builder),
    Decimal(Decimal128Builder, i8),
    Text(StringBuilder),
    Date(Date32Builder),
    Instant(TimestampMicrosecondBuilder),
    Bool(BooleanBuilder),
}

pub(crate) fn schema_of(columns: &[SqlColumn]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow(), true))
            .collect::<Vec<_>>(),
    ))
}

impl ColumnsBuilder {
    pub(crate) fn new(columns: &[SqlColumn]) -> Self {
        let builders = columns
            .iter()
            .map(|c| {
                let b = match c.ty {
                    ColType::Int => Builder::Int(Int64Builder::new()),
                    ColType::Decimal(s) => Builder::Decimal(
                        Decimal128Builder::new()
                            .with_precision_and_scale(38, s)
                            .unwrap_or_default(),
                        s,
                    ),
                    ColType::Text | ColType::Json | ColType::Uuid => {
                        Builder::Text(StringBuilder::new())
                    }
                    ColType::Date => Builder::Date(Date32Builder::new()),
                    ColType::Timestamp | ColType::TimestampTz => {
                        Builder::Instant(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
                    }
                    ColType::Bool => Builder::Bool(BooleanBuilder::new()),
                };
                (c.ty, b)
            })
            .collect();
        ColumnsBuilder {
            schema: schema_of(columns),
            columns: builders,
        }
    }

    pub(crate) fn push(&mut self, cells: Vec<Cell>) -> Result<(), SourceError> {
        for ((_, builder), cell) in self.columns.iter_mut().zip(cells) {
            match (builder, cell) {
                (Builder::Int(b), Cell::Int(v)) => b.append_value(v),
                (Builder::Decimal(b, scale), Cell::Decimal(mut d)) => {
                    d.rescale(*scale as u32);
                    b.append_value(d.mantissa());
                }
                (Builder::Text(b), Cell::Text(v)) => b.append_value(v),
                (Builder::Date(b), Cell::Date(d)) => b.append_value(days_since_epoch(d)),
                (Builder::Instant(b), Cell::Instant(t)) => b.append_value(t.timestamp_micros()),
                (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
                (Builder::Int(b), Cell::Null) => b.append_null(),
                (Builder::Decimal(b, _), Cell::Null) => b.append_null(),
                (Builder::Text(b), Cell::Null) => b.append_null(),
                (Builder::Date(b), Cell::Null) => b.append_null(),
                (Builder::Instant(b), Cell::Null) => b.append_null(),
                (Builder::Bool(b), Cell::Null) => b.append_null(),
                (_, cell) => {
                    return Err(SourceError::new(
                        SourceErrorKind::Format,
                        format!("a value {cell:?} does not fit its column type"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) -> Result<RecordBatch, SourceError> {
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|(_, b)| -> ArrayRef {
                match b {
                    Builder::Int(b) => Arc::new(b.finish()),
                    Builder::Decimal(b, _) => Arc::new(b.finish()),
                    Builder::Text(b) => Arc::new(b.finish()),
                    Builder::Date(b) => Arc::new(b.finish()),
                    Builder::Instant(b) => Arc::new(b.finish()),
                    Builder::Bool(b) => Arc::new(b.finish()),
                }
            })
            .collect();
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| {
            SourceError::new(SourceErrorKind::Format, "building a record batch").with_source(e)
        })
    }
}

fn days_since_epoch(d: NaiveDate) -> i32 {
    (d - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()).num_days() as i32
}

/// Classifies a driver error: connection problems are transient, the rest permanent.
pub(crate) fn sql_error(context: &str, e: sqlx::Error) -> SourceError {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => SourceErrorKind::Transient,
        sqlx::Error::Database(d) => match d.code().as_deref() {
            Some(c)
                if c.starts_with("08")
                    || c == "57P01"
                    || c == "40001"
                    || c == "40P01"
                    || c == "HY000" && d.message().contains("gone away") =>
            {
                SourceErrorKind::Transient
            }
            Some("28000" | "28P01") => SourceErrorKind::Auth,
            Some(c) if c.starts_with("42") => SourceErrorKind::Config,
            _ => SourceErrorKind::Transient,
        },
        sqlx::Error::Protocol(_) => SourceErrorKind::Transient,
        _ => SourceErrorKind::Format,
    };
    // sqlx errors never contain the connection password.
    SourceError::new(kind, context.to_string()).with_source(e)
}

/// Where paging stands: the cursor values of the last row emitted.
pub(crate) fn cursor_json(values: &[Cell]) -> Value {
    json!({ "after": values.iter().map(Cell::to_json).collect::<Vec<_>>() })
}

pub(crate) fn cursor_values(cursor: Option<&Value>, types: &[ColType]) -> Option<Vec<Cell>> {
    let after = cursor?.get("after")?.as_array()?;
    if after.len() != types.len() {
        return None;
    }
    after
        .iter()
        .zip(types)
        .map(|(v, t)| Cell::from_json(v, *t))
        .collect()
}

/// A PostgreSQL or MySQL table/query as a [`Source`].
#[derive(Debug, Clone)]
pub struct SqlSource {
    config: SqlSourceConfig,
}

impl SqlSource {
    /// A source; identifiers in `config` are checked here, before any connection.
    pub fn new(config: SqlSourceConfig) -> Result<Self, SourceError> {
        if config.cursor.len() > 2 {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                "cursor takes one or two columns (e.g. [\"updated_at\", \"id\"])",
            ));
        }
        for c in &config.cursor {
            check_identifier("cursor column", c)?;
        }
        if let SqlTarget::Table { schema, name } = &config.target {
            if let Some(s) = schema {
                check_identifier("schema", s)?;
            }
            check_identifier("table", name)?;
        }
        Ok(SqlSource { config })
    }

    fn stream_name(&self) -> String {
        match &self.config.target {
            SqlTarget::Table {
                schema: Some(s),
                name,
            } => format!("{s}.{name}"),
            SqlTarget::Table { schema: None, name } => name.clone(),
            SqlTarget::Query(_) => "query".into(),
        }
    }

    fn sync_mode(&self) -> SyncMode {
        if self.config.cursor.is_empty() {
            SyncMode::FullRefresh
        } else {
            SyncMode::Incremental
        }
    }

    async fn columns(&self) -> Result<Vec<SqlColumn>, SourceError> {
        let columns = match self.config.kind {
            SqlKind::Postgres => postgres::discover(&self.config).await?,
            SqlKind::Mysql => mysql::discover(&self.config).await?,
        };
        for c in &self.config.cursor {
            let Some(col) = columns.iter().find(|x| &x.name == c) else {
                return Err(SourceError::new(
                    SourceErrorKind::Config,
                    format!(
                        "cursor column {c:?} is not a column of {}",
                        self.stream_name()
                    ),
                ));
            };
            if col.nullable && matches!(self.config.target, SqlTarget::Table { .. }) {
                return Err(SourceError::new(
                    SourceErrorKind::Config,
                    format!(
                        "cursor column {c:?} is nullable: rows where it is NULL would never be read incrementally. Make it NOT NULL, or use a `query` that COALESCEs it"
                    ),
                ));
            }
        }
        Ok(columns)
    }
}

/// A table the database offers, with each column's type and how sluice reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CatalogTable {
    /// `schema.table`.
    pub name: String,
    /// The table's columns in order.
    pub columns: Vec<CatalogColumn>,
}

/// One column of a [`CatalogTable`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CatalogColumn {
    /// Column name.
    pub name: String,
    /// The database's type name.
    pub database_type: String,
    /// The Arrow type sluice reads it as, or why it cannot.
    pub reads_as: Result<String, String>,
    /// Whether it may be NULL.
    pub nullable: bool,
}

impl SqlSource {
    /// Every table the connection can see (outside the system schemas), with its columns
    /// and their mapped types.
    pub async fn catalog(&self) -> Result<Vec<CatalogTable>, SourceError> {
        let rows = match self.config.kind {
            SqlKind::Postgres => postgres::catalog(&self.config).await?,
            SqlKind::Mysql => mysql::catalog(&self.config).await?,
        };
        let mut tables: Vec<CatalogTable> = Vec::new();
        for (table, column, database_type, nullable, mapped) in rows {
            let col = CatalogColumn {
                name: column,
                database_type,
                reads_as: mapped
                    .map(|t| t.arrow().to_string())
                    .map_err(|e| e.message().to_string()),
                nullable,
            };
            match tables.last_mut() {
                Some(t) if t.name == table => t.columns.push(col),
                _ => tables.push(CatalogTable {
                    name: table,
                    columns: vec![col],
                }),
            }
        }
        Ok(tables)
    }
}

/// One catalog row: table, column, database type, nullable, how it maps.
pub(crate) type CatalogRow = (String, String, String, bool, Result<ColType, SourceError>);

impl Source for SqlSource {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        let columns = self.columns().await?;
        Ok(vec![StreamInfo {
            name: self.stream_name(),
            schema: schema_of(&columns),
            sync_mode: self.sync_mode(),
        }])
    }

    async fn check(&self) -> Result<HealthReport, SourceError> {
        let started = std::time::Instant::now();
        let detail = match self.config.kind {
            SqlKind::Postgres => postgres::check(&self.config).await?,
            SqlKind::Mysql => mysql::check(&self.config).await?,
        };
        Ok(HealthReport {
            detail,
            latency: started.elapsed(),
        })
    }

    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        let columns = self.columns().await?;
        let location = format!(
            "{}:{}",
            match self.config.kind {
                SqlKind::Postgres => "postgres",
                SqlKind::Mysql => "mysql",
            },
            self.stream_name()
        );
        let plan = ReadPlan {
            config: self.config.clone(),
            columns,
            from: request.from,
            batch_rows: request.batch_rows.max(1),
            location,
        };
        Ok(match self.config.kind {
            SqlKind::Postgres => postgres::read(plan),
            SqlKind::Mysql => mysql::read(plan),
        })
    }
}

/// Everything a reader task needs.
pub(crate) struct ReadPlan {
    pub(crate) config: SqlSourceConfig,
    pub(crate) columns: Vec<SqlColumn>,
    pub(crate) from: Option<Value>,
    pub(crate) batch_rows: usize,
    pub(crate) location: String,
}

impl ReadPlan {
    pub(crate) fn cursor_indices(&self) -> Vec<usize> {
        self.config
            .cursor
            .iter()
            .filter_map(|c| self.columns.iter().position(|x| &x.name == c))
            .collect()
    }

    pub(crate) fn cursor_types(&self) -> Vec<ColType> {
        self.cursor_indices()
            .iter()
            .map(|&i| self.columns[i].ty)
            .collect()
    }

    /// `SELECT cols FROM source` and, for keyset pages, the WHERE and ORDER BY, with
    /// placeholders produced by `ph(n)` (1-based) and identifiers quoted by `q`.
    ///
    /// Two cursor columns page with `(c1, c2) > (v1, v2)` where the database seeks an index
    /// on it (`row_values`, PostgreSQL), else with `c1 >= v1 AND (c1 > v1 OR c2 > v2)`,
    /// which keeps a range on `c1` usable (MySQL/MariaDB). Either way no page rescans the
    /// rows before it.
    pub(crate) fn page_sql(
        &self,
        q: &dyn Fn(&str) -> String,
        ph: &dyn Fn(usize) -> String,
        row_values: bool,
        after: bool,
        limit: Option<usize>,
    ) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| q(&c.name)).collect();
        let source = match &self.config.target {
            SqlTarget::Table {
                schema: Some(s),
                name,
            } => format!("{}.{}", q(s), q(name)),
            SqlTarget::Table { schema: None, name } => q(name),
            SqlTarget::Query(sql) => format!("({sql}) AS sluice_q"),
        };
        let cur: Vec<String> = self.config.cursor.iter().map(|c| q(c)).collect();
        let mut sql = format!("SELECT {} FROM {source}", cols.join(", "));
        if after {
            match cur.as_slice() {
                [c1] => sql.push_str(&format!(" WHERE {c1} > {}", ph(1))),
                [c1, c2] if row_values => {
                    sql.push_str(&format!(" WHERE ({c1}, {c2}) > ({}, {})", ph(1), ph(2)))
                }
                [c1, c2] => sql.push_str(&format!(
                    " WHERE {c1} >= {} AND ({c1} > {} OR {c2} > {})",
                    ph(1),
                    ph(2),
                    ph(3)
                )),
                _ => {}
            }
        }
        if !cur.is_empty() {
            sql.push_str(&format!(" ORDER BY {}", cur.join(", ")));
        }
        if let Some(n) = limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        sql
    }

    /// The rest of a group of rows sharing the last single-column cursor value.
    pub(crate) fn group_sql(
        &self,
        q: &dyn Fn(&str) -> String,
        ph: &dyn Fn(usize) -> String,
    ) -> String {
        let base = self.page_sql(q, ph, false, false, None);
        let c1 = q(&self.config.cursor[0]);
        match base.find(" ORDER BY") {
            Some(i) => format!("{} WHERE {c1} = {}", &base[..i], ph(1)),
            None => format!("{base} WHERE {c1} = {}", ph(1)),
        }
    }

    pub(crate) fn batch(
        &self,
        records: RecordBatch,
        first_ordinal: u64,
        cursor: Value,
    ) -> SourceBatch {
        let n = records.num_rows() as u64;
        SourceBatch {
            positions: (first_ordinal..first_ordinal + n).collect(),
            records,
            rejects: Vec::new(),
            deletions: Vec::new(),
            cursor,
            location: self.location.clone(),
            sheet: None,
        }
    }
}

/// What the keyset reader needs from a database connection.
pub(crate) trait PageConn: Send {
    /// Quotes an identifier.
    fn quote(name: &str) -> String;
    /// The `n`th (1-based) bind placeholder.
    fn placeholder(n: usize) -> String;
    /// Whether keyset pages may compare row values (`(a, b) > (x, y)`) with an index seek.
    const ROW_VALUES: bool;
    /// Starts a page's read-only snapshot transaction.
    fn begin_page(&mut self) -> impl std::future::Future<Output = Result<(), SourceError>> + Send;
    /// Ends it.
    fn end_page(&mut self) -> impl std::future::Future<Output = Result<(), SourceError>> + Send;
    /// Streams and decodes the rows of `sql` (no arguments), for a full refresh.
    fn stream_rows<'a>(
        &'a mut self,
        sql: String,
        columns: &'a [SqlColumn],
    ) -> futures_util::stream::BoxStream<'a, Result<Vec<Cell>, SourceError>>;
    /// Runs `sql` with `args` (each with its column type) and decodes every row.
    fn fetch_rows(
        &mut self,
        sql: String,
        args: Vec<(Cell, ColType)>,
        columns: &[SqlColumn],
    ) -> impl std::future::Future<Output = Result<Vec<Vec<Cell>>, SourceError>> + Send;
}

/// A source connection whose every wait is bounded. The server stops any statement at
/// the statement timeout, so a wait longer than that (plus [`STALL_GRACE`]) is a
/// connection that stalled: a peer gone without a reset, a middlebox holding the bytes.
/// Without the bound such a read waits until the job timeout, hours later, holding the
/// pipeline; with it the attempt fails as transient and is retried.
pub(crate) struct Bounded<C> {
    inner: C,
    limit: Duration,
}

/// What a stalled wait fails with.
fn stalled(limit: Duration, what: &str) -> SourceError {
    SourceError::new(
        SourceErrorKind::Transient,
        format!(
            "{what}: no answer in {} s (the statement timeout and a grace period); the connection stalled",
            limit.as_secs()
        ),
    )
}

async fn bounded<T>(
    limit: Duration,
    what: &str,
    work: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(stalled(limit, what)))
}

impl<C: PageConn> PageConn for Bounded<C> {
    fn quote(name: &str) -> String {
        C::quote(name)
    }
    fn placeholder(n: usize) -> String {
        C::placeholder(n)
    }
    const ROW_VALUES: bool = C::ROW_VALUES;
    fn begin_page(&mut self) -> impl std::future::Future<Output = Result<(), SourceError>> + Send {
        bounded(self.limit, "starting a page", self.inner.begin_page())
    }
    fn end_page(&mut self) -> impl std::future::Future<Output = Result<(), SourceError>> + Send {
        bounded(self.limit, "ending a page", self.inner.end_page())
    }
    fn stream_rows<'a>(
        &'a mut self,
        sql: String,
        columns: &'a [SqlColumn],
    ) -> futures_util::stream::BoxStream<'a, Result<Vec<Cell>, SourceError>> {
        use futures_util::StreamExt;
        let limit = self.limit;
        let rows = self.inner.stream_rows(sql, columns);
        // Each row within the limit; after a stall the stream ends with its error.
        futures_util::stream::unfold(Some(rows), move |rows| async move {
            let mut rows = rows?;
            match tokio::time::timeout(limit, rows.next()).await {
                Ok(Some(row)) => Some((row, Some(rows))),
                Ok(None) => None,
                Err(_) => Some((Err(stalled(limit, "reading rows")), None)),
            }
        })
        .boxed()
    }
    fn fetch_rows(
        &mut self,
        sql: String,
        args: Vec<(Cell, ColType)>,
        columns: &[SqlColumn],
    ) -> impl std::future::Future<Output = Result<Vec<Vec<Cell>>, SourceError>> + Send {
        bounded(
            self.limit,
            "reading a page",
            self.inner.fetch_rows(sql, args, columns),
        )
    }
}

/// How long past the statement timeout a wait may last before it counts as a stall.
pub const STALL_GRACE: Duration = Duration::from_secs(5);

pub(crate) type BatchSender = tokio::sync::mpsc::Sender<Result<SourceBatch, SourceError>>;

/// Reads the whole stream in one snapshot, streamed into batches of `batch_rows`.
pub(crate) async fn read_full_refresh<C: PageConn>(
    plan: &ReadPlan,
    conn: &mut C,
    out: &BatchSender,
) -> Result<(), SourceError> {
    use futures_util::StreamExt;
    conn.begin_page().await?;
    {
        let sql = plan.page_sql(&C::quote, &C::placeholder, C::ROW_VALUES, false, None);
        let mut rows = conn.stream_rows(sql, &plan.columns);
        let mut builder = ColumnsBuilder::new(&plan.columns);
        let (mut in_batch, mut ordinal) = (0usize, 1u64);
        while let Some(row) = rows.next().await {
            builder.push(row?)?;
            in_batch += 1;
            if in_batch == plan.batch_rows {
                let read = ordinal - 1 + in_batch as u64;
                let batch = plan.batch(
                    builder.finish()?,
                    ordinal,
                    json!({ "full_refresh_rows": read }),
                );
                ordinal += in_batch as u64;
                in_batch = 0;
                if out.send(Ok(batch)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if in_batch > 0 {
            let read = ordinal - 1 + in_batch as u64;
            let batch = plan.batch(
                builder.finish()?,
                ordinal,
                json!({ "full_refresh_rows": read }),
            );
            if out.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
        }
    }
    conn.end_page().await
}

/// Starts a reader task for `plan` on a connection made by `connect`, as a [`BatchStream`].
pub(crate) fn spawn_read<C, F, Fut>(plan: ReadPlan, connect: F) -> BatchStream
where
    C: PageConn + 'static,
    F: FnOnce(SqlSourceConfig) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<C, SourceError>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let result = async {
            let mut conn = Bounded {
                limit: plan.config.timeouts.stall_limit(),
                inner: connect(plan.config.clone()).await?,
            };
            if plan.config.cursor.is_empty() {
                read_full_refresh(&plan, &mut conn, &tx).await
            } else {
                read_incremental(&plan, &mut conn, &tx).await
            }
        }
        .await;
        if let Err(e) = result {
            let _ = tx.send(Err(e.with_context(&plan.location))).await;
        }
    });
    crate::source::channel_stream(rx)
}

/// Reads a stream page by page in cursor order, each page in its own snapshot, sending one
/// batch per page whose cursor is the last row's cursor values.
pub(crate) async fn read_incremental<C: PageConn>(
    plan: &ReadPlan,
    conn: &mut C,
    out: &BatchSender,
) -> Result<(), SourceError> {
    let types = plan.cursor_types();
    let idx = plan.cursor_indices();
    let mut after = cursor_values(plan.from.as_ref(), &types);
    if plan.from.is_some() && after.is_none() {
        tracing::warn!(stream = %plan.location, "saved cursor does not fit this stream's cursor columns; reading from the start");
    }
    let mut ordinal = 1u64;
    loop {
        conn.begin_page().await?;
        let sql = plan.page_sql(
            &C::quote,
            &C::placeholder,
            C::ROW_VALUES,
            after.is_some(),
            Some(plan.batch_rows),
        );
        let args: Vec<(Cell, ColType)> = match &after {
            Some(values) => {
                let arg_types: Vec<ColType> = if types.len() == 2 && !C::ROW_VALUES {
                    vec![types[0], types[0], types[1]]
                } else {
                    types.clone()
                };
                keyset_args(values, C::ROW_VALUES)
                    .into_iter()
                    .zip(arg_types)
                    .collect()
            }
            None => Vec::new(),
        };
        let mut cells = conn.fetch_rows(sql, args, &plan.columns).await?;
        let full_page = cells.len() == plan.batch_rows;
        if full_page && idx.len() == 1 {
            // One cursor column: finish the group of rows sharing the page's last value,
            // so the next page can start strictly after it without missing any.
            let last = cells
                .last()
                .map(|r| r[idx[0]].clone())
                .unwrap_or(Cell::Null);
            cells.retain(|r| r[idx[0]] != last);
            let group_sql = plan.group_sql(&C::quote, &C::placeholder);
            let group = conn
                .fetch_rows(group_sql, vec![(last, types[0])], &plan.columns)
                .await?;
            cells.extend(group);
        }
        conn.end_page().await?;
        let Some(last_row) = cells.last() else {
            return Ok(());
        };
        let values: Vec<Cell> = idx.iter().map(|&i| last_row[i].clone()).collect();
        let n = cells.len() as u64;
        let mut builder = ColumnsBuilder::new(&plan.columns);
        for row in cells {
            builder.push(row)?;
        }
        let batch = plan.batch(builder.finish()?, ordinal, cursor_json(&values));
        ordinal += n;
        after = Some(values);
        if out.send(Ok(batch)).await.is_err() || !full_page {
            return Ok(());
        }
    }
}

/// Cursor values as bind arguments for the keyset WHERE (see [`ReadPlan::page_sql`]):
/// `[v1]`, `[v1, v2]` for row values, or `[v1, v1, v2]`.
pub(crate) fn keyset_args(values: &[Cell], row_values: bool) -> Vec<Cell> {
    match values {
        [v1, v2] if !row_values => vec![v1.clone(), v1.clone(), v2.clone()],
        other => other.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_that_try_sql_are_refused() {
        for bad in [
            "inv\"oices",
            "inv;drop",
            "inv--",
            "inv/*x*/",
            "a b",
            "1abc",
            "",
            "a.b.c",
        ] {
            assert!(SqlTarget::table(bad).is_err(), "{bad:?} accepted");
        }
        assert!(SqlTarget::table("public.invoices").is_ok());
        assert!(SqlTarget::query("SELECT 1; DROP TABLE x").is_err());
        assert!(SqlTarget::query("DELETE FROM x").is_err());
        assert!(SqlTarget::query("with a as (select 1) select * from a").is_ok());
    }

    #[test]
    fn a_destination_is_host_port_user_and_database() {
        let d = |u| destination(u).expect("url");
        assert_eq!(
            d("postgres://erp:pw@DB:5433/books"),
            d("postgres://erp@db:5433/books?sslmode=require")
        );
        assert_ne!(
            d("postgres://erp@db/books"),
            d("postgres://erp@evil.example/books")
        );
        assert_ne!(
            d("postgres://erp@db/books"),
            d("postgres://erp@db/books?host=evil.example")
        );
        assert_ne!(
            d("postgres://erp@db/books"),
            d("postgres://erp@db:6543/books")
        );
        assert_ne!(d("postgres://erp@db/books"), d("postgres://other@db/books"));
        assert_ne!(d("postgres://erp@db/books"), d("postgres://erp@db/other"));
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("postgres://erp:hunter2@db:5432/erp"),
            "postgres://erp@db:5432/erp"
        );
        assert_eq!(
            redact_url(
                "postgres://db/erp?user=erp&password=hunter2&sslmode=require&sslpassword=k#x"
            ),
            "postgres://db/erp?user=erp&sslmode=require#x"
        );
        assert_eq!(redact_url("mysql://db/erp?PassWord=x"), "mysql://db/erp");
        let cfg = SqlSourceConfig {
            kind: SqlKind::Postgres,
            url: "postgres://erp:hunter2@db/erp".into(),
            password: Some("s3cret".into()),
            target: SqlTarget::Query("select 1".into()),
            cursor: vec![],
            tls: None,
            egress: EgressPolicy::default(),
            timeouts: SqlTimeouts::default(),
        };
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
