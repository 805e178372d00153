//! PostgreSQL's binary COPY format for a canonical batch: amounts, dates and instants cross
//! the wire without any text parsing. Must never round an amount.

use crate::columns::{CanonicalColumn, canonical_columns};
use crate::entity::{Entity, FieldKind};
use crate::money::MONEY_SCALE;
use arrow_array::RecordBatch;
use sqlx::{Postgres, Transaction};

/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
pub(super) const PG_EPOCH_DAYS: i32 = 10_957;

/// Microseconds from 1970-01-01 to 2000-01-01.
pub(super) const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// PostgreSQL's binary `numeric` for an amount in units of 1/10000: base-10000 digits, the
/// last of them the four decimals, so the value crosses the wire without any text parsing.
pub(super) fn put_numeric(out: &mut Vec<u8>, units: i128) {
    let negative = units < 0;
    let abs = units.unsigned_abs();
    let mut int_digits: Vec<i16> = Vec::new();
    let mut int = abs / 10_000;
    while int > 0 {
        int_digits.push((int % 10_000) as i16);
        int /= 10_000;
    }
    int_digits.reverse();
    let weight = int_digits.len() as i16 - 1;
    let mut digits = int_digits;
    digits.push((abs % 10_000) as i16);
    while digits.last() == Some(&0) {
        digits.pop();
    }
    let (weight, sign) = if digits.is_empty() {
        (0, 0u16)
    } else {
        (weight, if negative { 0x4000 } else { 0 })
    };
    let len = 8 + 2 * digits.len();
    out.extend_from_slice(&(len as i32).to_be_bytes());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(MONEY_SCALE as u16).to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
}

pub(super) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

pub(super) fn put_null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

pub(super) fn put_instant(out: &mut Vec<u8>, micros: i64) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&(micros - PG_EPOCH_MICROS).to_be_bytes());
}

/// The selected rows (row index, fingerprint) in COPY binary format, in [`Entity::table_columns`]
/// order: no text for the server to parse.
pub(super) fn copy_rows(
    entity: Entity,
    rows: &RecordBatch,
    deleted: &[Option<i64>],
    selection: &[(u32, u128)],
    source: &str,
    loaded_at_micros: i64,
    run_id: &str,
) -> Vec<u8> {
    let cols = canonical_columns(entity, rows);
    let width = (entity.table_columns().len()) as i16;
    let mut out = Vec::with_capacity(19 + selection.len() * 220);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for &(row, fingerprint) in selection {
        let row = row as usize;
        out.extend_from_slice(&width.to_be_bytes());
        put_bytes(&mut out, source.as_bytes());
        for (kind, col) in &cols {
            if !col.is_valid(row) {
                put_null(&mut out);
                continue;
            }
            match col {
                CanonicalColumn::Text(a) if *kind == FieldKind::IdList => {
                    let v = a.value(row).as_bytes();
                    out.extend_from_slice(&(v.len() as i32 + 1).to_be_bytes());
                    out.push(1); // jsonb binary format version
                    out.extend_from_slice(v);
                }
                CanonicalColumn::Text(a) => put_bytes(&mut out, a.value(row).as_bytes()),
                CanonicalColumn::Date(a) => {
                    out.extend_from_slice(&4i32.to_be_bytes());
                    out.extend_from_slice(&(a.value(row) - PG_EPOCH_DAYS).to_be_bytes());
                }
                CanonicalColumn::Instant(a) => put_instant(&mut out, a.value(row)),
                CanonicalColumn::Money(a) => put_numeric(&mut out, a.value(row)),
                CanonicalColumn::Flag(a) => {
                    out.extend_from_slice(&1i32.to_be_bytes());
                    out.push(u8::from(a.value(row)));
                }
            }
        }
        match deleted.get(row).copied().flatten() {
            Some(at) => put_instant(&mut out, at),
            None => put_null(&mut out),
        }
        put_instant(&mut out, loaded_at_micros);
        put_bytes(&mut out, run_id.as_bytes());
        put_bytes(&mut out, &fingerprint.to_le_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

pub(super) async fn copy_in(
    tx: &mut Transaction<'static, Postgres>,
    statement: &str,
    data: Vec<u8>,
) -> std::result::Result<(), sqlx::Error> {
    let mut copy = tx.copy_in_raw(statement).await?;
    copy.send(data).await?;
    copy.finish().await.map(|_| ())
}
