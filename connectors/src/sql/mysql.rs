//! MySQL and MariaDB as a source: catalog discovery, keyset pages in consistent-snapshot
//! read-only transactions, typed decoding. Sessions run in UTC so TIMESTAMP columns convert
//! exactly.

use std::str::FromStr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlRow, MySqlSslMode};
use sqlx::{AssertSqlSafe, Column, ConnectOptions, Executor, Row, Statement, TypeInfo};

use super::{
    Cell, ColType, PageConn, ReadPlan, SqlColumn, SqlSourceConfig, SqlTarget, TlsMode,
    pinned_address, redact_url, spawn_read, sql_error, within_connect_timeout,
};
use crate::error::{SourceError, SourceErrorKind};
use crate::source::BatchStream;

fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

fn placeholder(_: usize) -> String {
    "?".to_string()
}

async fn connect(config: &SqlSourceConfig) -> Result<MySqlConnection, SourceError> {
    let mut options = MySqlConnectOptions::from_str(&config.url).map_err(|_| {
        SourceError::new(
            SourceErrorKind::Config,
            format!("not a valid MySQL URL: {}", redact_url(&config.url)),
        )
    })?;
    if let Some(p) = &config.password {
        options = options.password(p);
    }
    if let Some(tls) = config.tls {
        options = options.ssl_mode(match tls {
            TlsMode::Disable => MySqlSslMode::Disabled,
            TlsMode::Prefer => MySqlSslMode::Preferred,
            TlsMode::Require => MySqlSslMode::Required,
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
    let mut conn = within_connect_timeout(config.timeouts, &config.url, async {
        options
            .connect()
            .await
            .map_err(|e| sql_error(&format!("connecting to {}", redact_url(&config.url)), e))
    })
    .await?;
    conn.execute("SET time_zone = '+00:00'")
        .await
        .map_err(|e| sql_error("setting the session time zone", e))?;
    // MariaDB bounds every statement in seconds, MySQL a SELECT in milliseconds; each
    // server knows one of the two variables.
    let statement = config.timeouts.statement;
    let mariadb = format!(
        "SET SESSION max_statement_time = {}",
        statement.as_secs_f64()
    );
    let mysql = format!("SET SESSION max_execution_time = {}", statement.as_millis());
    if conn.execute(AssertSqlSafe(mariadb)).await.is_err() {
        conn.execute(AssertSqlSafe(mysql))
            .await
            .map_err(|e| sql_error("setting the statement timeout", e))?;
    }
    Ok(conn)
}

fn col_type(
    name: &str,
    data_type: &str,
    column_type: &str,
    scale: Option<i64>,
) -> Result<ColType, SourceError> {
    let dt = data_type.to_ascii_lowercase();
    Ok(match dt.as_str() {
        "tinyint" if column_type.eq_ignore_ascii_case("tinyint(1)") => ColType::Bool,
        "boolean" => ColType::Bool,
        // An unsigned BIGINT can exceed i64: read it as its exact decimal text.
        "bigint" if column_type.to_ascii_lowercase().contains("unsigned") => ColType::Text,
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => ColType::Int,
        "decimal" | "newdecimal" => match scale {
            Some(s) if (0..=30).contains(&s) => ColType::Decimal(s as i8),
            _ => ColType::Text,
        },
        "char" | "varchar" | "text" | "tinytext" | "mediumtext" | "longtext" | "enum" | "set" => {
            ColType::Text
        }
        "json" => ColType::Json,
        "date" => ColType::Date,
        "datetime" => ColType::Timestamp,
        "timestamp" => ColType::TimestampTz,
        other => {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                format!(
                    "column {name:?} has type {other}, which sluice does not read; cast it in a `query` (e.g. to DECIMAL or CHAR)"
                ),
            ));
        }
    })
}

pub(super) async fn discover(config: &SqlSourceConfig) -> Result<Vec<SqlColumn>, SourceError> {
    let mut conn = connect(config).await?;
    match &config.target {
        SqlTarget::Table { schema, name } => {
            let rows: Vec<(String, String, String, String, Option<u64>)> = sqlx::query_as(
                "SELECT CAST(column_name AS CHAR), CAST(data_type AS CHAR), CAST(column_type AS CHAR), CAST(is_nullable AS CHAR), numeric_scale \
                 FROM information_schema.columns \
                 WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ? ORDER BY ordinal_position",
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
                .map(|(n, dt, ct, nullable, scale)| {
                    Ok(SqlColumn {
                        ty: col_type(&n, &dt, &ct, scale.map(|s| s as i64))?,
                        name: n,
                        nullable: nullable == "YES",
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
                    let ty = c.type_info().name().to_ascii_lowercase();
                    let (dt, ct) = match ty.as_str() {
                        "boolean" => ("tinyint".to_string(), "tinyint(1)".to_string()),
                        t => (
                            t.split_whitespace().next().unwrap_or(t).to_string(),
                            t.to_string(),
                        ),
                    };
                    Ok(SqlColumn {
                        name: c.name().to_string(),
                        ty: col_type(c.name(), &dt, &ct, None)?,
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
    let rows: Vec<(String, String, String, String, String, Option<u64>)> = sqlx::query_as(
        "SELECT CAST(CONCAT(table_schema, '.', table_name) AS CHAR), CAST(column_name AS CHAR), CAST(data_type AS CHAR), \
                CAST(column_type AS CHAR), CAST(is_nullable AS CHAR), numeric_scale \
         FROM information_schema.columns WHERE table_schema = DATABASE() ORDER BY table_name, ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| sql_error("reading the catalog", e))?;
    Ok(rows
        .into_iter()
        .map(|(t, c, dt, ct, nullable, scale)| {
            let mapped = col_type(&c, &dt, &ct, scale.map(|s| s as i64));
            (t, c, ct, nullable == "YES", mapped)
        })
        .collect())
}

pub(super) async fn check(config: &SqlSourceConfig) -> Result<String, SourceError> {
    let mut conn = connect(config).await?;
    let version: String = sqlx::query_scalar("SELECT CAST(VERSION() AS CHAR)")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| sql_error("reading the server version", e))?;
    let privilege = match &config.target {
        SqlTarget::Table { schema, name } => {
            let qualified = match schema {
                Some(s) => format!("{}.{}", quote(s), quote(name)),
                None => quote(name),
            };
            sqlx::raw_sql(AssertSqlSafe(format!("SELECT 1 FROM {qualified} LIMIT 0")))
                .execute(&mut conn)
                .await
                .map_err(|e| sql_error(&format!("checking SELECT on {qualified}"), e))?;
            format!("SELECT on {qualified} works")
        }
        SqlTarget::Query(_) => {
            discover(config).await?;
            "query describes".to_string()
        }
    };
    Ok(format!("connected to MySQL/MariaDB {version}; {privilege}"))
}

fn decode(row: &MySqlRow, i: usize, ty: ColType) -> Result<Cell, sqlx::Error> {
    Ok(match ty {
        ColType::Int => match row.try_get::<Option<i64>, _>(i) {
            Ok(v) => v.map_or(Cell::Null, Cell::Int),
            Err(_) => match row.try_get::<Option<u64>, _>(i)? {
                None => Cell::Null,
                Some(u) => i64::try_from(u)
                    .map(Cell::Int)
                    .unwrap_or_else(|_| Cell::Text(u.to_string())),
            },
        },
        ColType::Decimal(_) => row
            .try_get::<Option<Decimal>, _>(i)?
            .map_or(Cell::Null, Cell::Decimal),
        ColType::Text | ColType::Uuid => match row.try_get::<Option<String>, _>(i) {
            Ok(v) => v.map_or(Cell::Null, Cell::Text),
            Err(_) => match row.try_get::<Option<u64>, _>(i) {
                Ok(v) => v.map_or(Cell::Null, |u| Cell::Text(u.to_string())),
                Err(_) => row
                    .try_get::<Option<Decimal>, _>(i)?
                    .map_or(Cell::Null, |d| Cell::Text(d.to_string())),
            },
        },
        ColType::Json => match row.try_get::<Option<String>, _>(i) {
            Ok(v) => v.map_or(Cell::Null, Cell::Text),
            Err(_) => row
                .try_get::<Option<sqlx::types::Json<serde_json::Value>>, _>(i)?
                .map_or(Cell::Null, |j| Cell::Text(j.0.to_string())),
        },
        ColType::Date => row
            .try_get::<Option<NaiveDate>, _>(i)?
            .map_or(Cell::Null, Cell::Date),
        ColType::Timestamp => row
            .try_get::<Option<NaiveDateTime>, _>(i)?
            .map_or(Cell::Null, |t| Cell::Instant(t.and_utc())),
        ColType::TimestampTz => row
            .try_get::<Option<DateTime<Utc>>, _>(i)?
            .map_or(Cell::Null, Cell::Instant),
        ColType::Bool => row
            .try_get::<Option<bool>, _>(i)?
            .map_or(Cell::Null, Cell::Bool),
    })
}

fn decode_row(row: &MySqlRow, columns: &[SqlColumn]) -> Result<Vec<Cell>, sqlx::Error> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| decode(row, i, c.ty))
        .collect()
}

fn bind<'q>(
    q: sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>,
    cell: &Cell,
) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
    match cell {
        Cell::Int(v) => q.bind(*v),
        Cell::Decimal(d) => q.bind(*d),
        Cell::Text(t) => q.bind(t.clone()),
        Cell::Date(d) => q.bind(*d),
        Cell::Instant(t) => q.bind(t.naive_utc()),
        Cell::Bool(b) => q.bind(*b),
        Cell::Null => q.bind(Option::<String>::None),
    }
}

pub(super) fn read(plan: ReadPlan) -> BatchStream {
    spawn_read(plan, |config| async move { connect(&config).await })
}

impl PageConn for MySqlConnection {
    fn quote(name: &str) -> String {
        quote(name)
    }
    fn placeholder(n: usize) -> String {
        placeholder(n)
    }
    const ROW_VALUES: bool = false;

    async fn begin_page(&mut self) -> Result<(), SourceError> {
        self.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
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
        sqlx::query(AssertSqlSafe(sql))
            .fetch(self)
            .map(move |row| {
                let row = row.map_err(|e| sql_error("reading", e))?;
                decode_row(&row, columns).map_err(|e| sql_error("decoding", e))
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
        for (cell, _) in &args {
            q = bind(q, cell);
        }
        let rows = q
            .fetch_all(&mut *self)
            .await
            .map_err(|e| sql_error("reading a page", e))?;
        rows.iter()
            .map(|r| decode_row(r, columns))
            .collect::<Result<_, _>>()
            .map_err(|e| sql_error("decoding a page", e))
    }
}
