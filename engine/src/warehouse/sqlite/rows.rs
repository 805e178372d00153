//! Column reads of this backend that the shared decoders (`warehouse::rows`) do not cover.

use crate::error::{EngineError, ErrorKind, Result};
use crate::money::display_decimal;
use chrono::NaiveDate;
use rust_decimal::Decimal;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite};
use std::str::FromStr;

pub(super) fn get<T>(row: &SqliteRow, col: &str) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(col)
        .map_err(|e| EngineError::from_sqlx(format!("reading column {col}"), e))
}

pub(super) fn date_col(row: &SqliteRow, col: &str) -> Result<NaiveDate> {
    let text: String = get(row, col)?;
    NaiveDate::from_str(&text).map_err(|e| {
        EngineError::new(ErrorKind::Warehouse, format!("{col} holds {text:?}")).with_source(e)
    })
}

pub(super) fn money_col(row: &SqliteRow, col: &str) -> Result<Decimal> {
    let units: i64 = get(row, col)?;
    Ok(display_decimal(i128::from(units)))
}
