//! PostgreSQL as a source: catalog discovery, keyset pages in REPEATABLE READ READ ONLY
//! transactions, typed decoding.

use std::str::FromStr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow, PgSslMode};
use sqlx::{AssertSqlSafe, Column, ConnectOptions, Executor, Row, Statement, TypeInfo};

use super::{
    Cell, ColType, PageConn, ReadPlan, SqlColumn, SqlSourceConfig, SqlTarget, TlsMode,
    pinned_address, redact_url, spawn_read, sql_error, within_connect_timeout,
};
use crate::error::{SourceError, SourceErrorKind};
use crate::source::BatchStream;

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn placeholder(n: usize) -> String {
    format!("${n}")
}

async fn connect(config: &SqlSourceConfig) -> Result<PgConnection, SourceError> {
    let mut options = PgConnectOptions::from_str(&config.url).map_err(|_| {
        SourceError::new(
            SourceErrorKind::Config,
            format!("not a valid PostgreSQL URL: {}", redact_url(&config.url)),
        )
    })?;
    if let Some(p) = &config.password {
        options = options.password(p);
    }
    if let Some(tls) = config.tls {
        options = options.ssl_mode(match tls {
            TlsMode::Disable => PgSslMode::Disable,
            TlsMode::Prefer => PgSslMode::Prefer,
            TlsMode::Require => PgSslMode::Require,
        });
    }
    let pinned = pinned_address(
        &config.egress,
        options.get_host(),
        options.get_port(),
        options.get_socket().map(|p| p.as_path()),
    )
    .await?;
    if let Some(addr) = pinned {
        options = options.host(&addr.ip().to_string()).port(addr.port());
    }
    let statement_ms = config.timeouts.statement.as_millis().to_string();
    options = options.options([("statement_timeout", statement_ms.as_str())]);
    within_connect_timeout(config.timeouts, &config.url, async {
        options
            .connect()
            .await
            .map_err(|e| sql_error(&format!("connecting to {}", redact_url(&config.url)), e))
    })
    .await
}

fn col_type(name: &str, data_type: &str, scale: Option<i32>) -> Result<ColType, SourceError> {
    Ok(match data_type {
        "smallint" | "integer" | "bigint" | "INT2" | "INT4" | "INT8" => ColType::Int,
        "numeric" | "NUMERIC" => match scale {
            Some(s) if (0..=38).contains(&s) => ColType::Decimal(s as i8),
            _ => ColType::Text,
        },
        "text" | "character varying" | "character" | "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => {
            ColType::Text
        }
        "date" | "DATE" => ColType::Date,
        "timestamp without time zone" | "TIMESTAMP" => ColType::Timestamp,
        "timestamp with time zone" | "TIMESTAMPTZ" => ColType::TimestampTz,
        "boolean" | "BOOL" => ColType::Bool,
        "json" | "jsonb" | "JSON" | "JSONB" => ColType::Json,
        "uuid" | "UUID" => ColType::Uuid,
        other => {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                format!(
                    "column {name:?} has type {other}, which sluice does not read; cast it in a `query` (e.g. to numeric or text)"
                ),
            ));
        }
    })
}

pub(super) async fn discover(config: &SqlSourceConfig) -> Result<Vec<SqlColumn>, SourceError> {
    let mut conn = connect(config).await?;
    match &config.target {
        SqlTarget::Table { schema, name } => {
            let rows: Vec<(String, String, bool, Option<i32>)> = sqlx::query_as(
                "SELECT column_name::text, data_type::text, is_nullable = 'YES', numeric_scale::int \
                 FROM information_schema.columns \
                 WHERE table_schema = COALESCE($1, current_schema()) AND table_name = $2 ORDER BY ordinal_position",
            )
            .bind(schema)
            .bind(name)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| sql_error("reading the catalog", e))?;
            if rows.is_empty() {
                return Err(SourceError::new(
                    SourceErrorKind::NotFound,
                    format!(
                        "table {}{name} not found (or not visible to this user)",
                        schema.as_ref().map(|s| format!("{s}.")).unwrap_or_default()
                    ),
                ));
            }
            rows.into_iter()
                .map(|(n, t, nullable, scale)| {
                    Ok(SqlColumn {
                        ty: col_type(&n, &t, scale)?,
                        name: n,
                        nullable,
                    })
                })
                .collect()
        }
        SqlTarget::Query(sql) => {
            let described = (&mut conn)
                .prepare(sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(sql.clone())))
                .await
                .map_err(|e| sql_error("describing the query", e))?;
            described
                .columns()
                .iter()
                .map(|c| {
                    Ok(SqlColumn {
                        name: c.name().to_string(),
                        ty: col_type(c.name(), c.type_info().name(), None)?,
                        nullable: true,
                    })
                })
                .collect()
        }
    }
}

pub(super) async fn catalog(
    config: &SqlSourceConfig,
) -> Result<Vec<super::CatalogRow>, SourceError> {
    let mut conn = connect(config).await?;
    let rows: Vec<(String, String, String, bool, Option<i32>)> = sqlx::query_as(
        "SELECT table_schema::text || '.' || table_name::text, column_name::text, data_type::text, is_nullable = 'YES', numeric_scale::int \
         FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
         ORDER BY table_schema, table_name, ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| sql_error("reading the catalog", e))?;
    Ok(rows
        .into_iter()
        .map(|(t, c, dt, nullable, scale)| {
            let mapped = col_type(&c, &dt, scale);
            (t, c, dt, nullable, mapped)
        })
        .collect())
}

pub(super) async fn check(config: &SqlSourceConfig) -> Result<String, SourceError> {
    let mut conn = connect(config).await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| sql_error("reading the server version", e))?;
    let privilege = match &config.target {
        SqlTarget::Table { schema, name } => {
            let qualified = match schema {
                Some(s) => format!("{}.{}", quote(s), quote(name)),
                None => quote(name),
            };
            let ok: bool = sqlx::query_scalar("SELECT has_table_privilege($1, 'SELECT')")
                .bind(&qualified)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| sql_error(&format!("checking privileges on {qualified}"), e))?;
            if !ok {
                return Err(SourceError::new(
                    SourceErrorKind::Auth,
                    format!("this user may not SELECT from {qualified}"),
                ));
            }
            format!("SELECT on {qualified} granted")
        }
        SqlTarget::Query(_) => {
            discover(config).await?;
            "query describes".to_string()
        }
    };
    Ok(format!("connected to PostgreSQL {version}; {privilege}"))
}

fn decode(row: &PgRow, i: usize, type_name: &str) -> Result<Cell, sqlx::Error> {
    Ok(match type_name {
        "INT2" => row
            .try_get::<Option<i16>, _>(i)?
            .map_or(Cell::Null, |v| Cell::Int(v.into())),
        "INT4" => row
            .try_get::<Option<i32>, _>(i)?
            .map_or(Cell::Null, |v| Cell::Int(v.into())),
        "INT8" => row
            .try_get::<Option<i64>, _>(i)?
            .map_or(Cell::Null, Cell::Int),
        "NUMERIC" => match row.try_get::<Option<Decimal>, _>(i)? {
            None => Cell::Null,
            Some(d) => Cell::Decimal(d),
        },
        "DATE" => row
            .try_get::<Option<NaiveDate>, _>(i)?
            .map_or(Cell::Null, Cell::Date),
        "TIMESTAMP" => row
            .try_get::<Option<NaiveDateTime>, _>(i)?
            .map_or(Cell::Null, |t| Cell::Instant(t.and_utc())),
        "TIMESTAMPTZ" => row
            .try_get::<Option<DateTime<Utc>>, _>(i)?
            .map_or(Cell::Null, Cell::Instant),
        "BOOL" => row
            .try_get::<Option<bool>, _>(i)?
            .map_or(Cell::Null, Cell::Bool),
        "JSON" | "JSONB" => row
            .try_get::<Option<sqlx::types::Json<serde_json::Value>>, _>(i)?
            .map_or(Cell::Null, |j| Cell::Text(j.0.to_string())),
        "UUID" => row
            .try_get::<Option<sqlx::types::Uuid>, _>(i)?
            .map_or(Cell::Null, |u| Cell::Text(u.to_string())),
        _ => row
            .try_get::<Option<String>, _>(i)?
            .map_or(Cell::Null, Cell::Text),
    })
}

/// Numeric cells become text for columns read as text (numerics without a scale).
fn fit(cell: Cell, ty: ColType) -> Cell {
    match (cell, ty) {
        (Cell::Decimal(d), ColType::Text) => Cell::Text(d.to_string()),
        (c, _) => c,
    }
}

/// The server's type name of each column of a result, looked up once per result.
fn type_names(row: &PgRow) -> Vec<String> {
    row.columns()
        .iter()
        .map(|c| c.type_info().name().to_string())
        .collect()
}

fn decode_row(
    row: &PgRow,
    columns: &[SqlColumn],
    types: &[String],
) -> Result<Vec<Cell>, sqlx::Error> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| Ok(fit(decode(row, i, &types[i])?, c.ty)))
        .collect()
}

fn bind<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    cell: &Cell,
    ty: ColType,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    match (cell, ty) {
        (Cell::Int(v), _) => q.bind(*v),
        (Cell::Decimal(d), _) => q.bind(*d),
        (Cell::Text(t), ColType::Uuid) => {
            q.bind(sqlx::types::Uuid::parse_str(t).unwrap_or_default())
        }
        (Cell::Text(t), _) => q.bind(t.clone()),
        (Cell::Date(d), _) => q.bind(*d),
        (Cell::Instant(t), ColType::Timestamp) => q.bind(t.naive_utc()),
        (Cell::Instant(t), _) => q.bind(*t),
        (Cell::Bool(b), _) => q.bind(*b),
        (Cell::Null, _) => q.bind(Option::<String>::None),
    }
}

pub(super) fn read(plan: ReadPlan) -> BatchStream {
    spawn_read(plan, |config| async move { connect(&config).await })
}

impl PageConn for PgConnection {
    fn quote(name: &str) -> String {
        quote(name)
    }
    fn placeholder(n: usize) -> String {
        placeholder(n)
    }
    const ROW_VALUES: bool = true;

    async fn begin_page(&mut self) -> Result<(), SourceError> {
        self.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map(|_| ())
            .map_err(|e| sql_error("starting a page", e))
    }

    async fn end_page(&mut self) -> Result<(), SourceError> {
        self.execute("COMMIT")
            .await
            .map(|_| ())
            .map_err(|e| sql_error("ending a page", e))
    }

    fn stream_rows<'a>(
        &'a mut self,
        sql: String,
        columns: &'a [SqlColumn],
    ) -> futures_util::stream::BoxStream<'a, Result<Vec<Cell>, SourceError>> {
        use futures_util::StreamExt;
        let mut names: Option<Vec<String>> = None;
        sqlx::query(AssertSqlSafe(sql))
            .fetch(self)
            .map(move |row| {
                let row = row.map_err(|e| sql_error("reading", e))?;
                let names = names.get_or_insert_with(|| type_names(&row));
                decode_row(&row, columns, names).map_err(|e| sql_error("decoding", e))
            })
            .boxed()
    }

    async fn fetch_rows(
        &mut self,
        sql: String,
        args: Vec<(Cell, ColType)>,
        columns: &[SqlColumn],
    ) -> Result<Vec<Vec<Cell>>, SourceError> {
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (cell, ty) in &args {
            q = bind(q, cell, *ty);
        }
        let rows = q
            .fetch_all(&mut *self)
            .await
            .map_err(|e| sql_error("reading a page", e))?;
        let names = rows.first().map(type_names).unwrap_or_default();
        rows.iter()
            .map(|r| decode_row(r, columns, &names))
            .collect::<Result<_, _>>()
            .map_err(|e| sql_error("decoding a page", e))
    }
}
