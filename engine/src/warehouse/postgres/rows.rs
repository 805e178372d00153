//! Column reads of this backend that the shared decoders (`warehouse::rows`) do not cover.

use crate::error::{EngineError, ErrorKind, Result};
use crate::money::{MONEY_SCALE, display_decimal};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row};

/// A stored amount with the two-or-four decimal display the SQLite warehouse gives.
pub(super) fn normalize(d: Option<Decimal>) -> Result<Decimal> {
    let d = d.unwrap_or_default();
    let units = (d * Decimal::from(10i64.pow(MONEY_SCALE)))
        .trunc()
        .to_i128()
        .ok_or_else(|| {
            EngineError::new(ErrorKind::Warehouse, format!("amount {d} out of range"))
        })?;
    Ok(display_decimal(units))
}

pub(super) fn get<T>(row: &PgRow, col: &str) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(col)
        .map_err(|e| EngineError::from_sqlx(format!("reading column {col}"), e))
}
