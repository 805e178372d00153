//! Typed views of a canonical batch's columns, resolved once per batch so the per-row loops
//! of fingerprinting and loading never look a column up by name or downcast it again.

use arrow_array::{
    Array, BooleanArray, Date32Array, Decimal128Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};

use crate::entity::{Entity, FieldKind};
use crate::validate::{dates, flags, money, strings, timestamps};

/// One canonical column, by its Arrow type.
#[derive(Debug, Clone, Copy)]
pub enum CanonicalColumn<'a> {
    /// Text, currency codes, enum words and id lists.
    Text(&'a StringArray),
    /// Days since 1970-01-01.
    Date(&'a Date32Array),
    /// UTC microseconds.
    Instant(&'a TimestampMicrosecondArray),
    /// Amounts in units of 1/10000.
    Money(&'a Decimal128Array),
    /// Booleans.
    Flag(&'a BooleanArray),
}

impl CanonicalColumn<'_> {
    /// Whether the cell at `row` holds a value.
    pub fn is_valid(&self, row: usize) -> bool {
        match self {
            CanonicalColumn::Text(a) => a.is_valid(row),
            CanonicalColumn::Date(a) => a.is_valid(row),
            CanonicalColumn::Instant(a) => a.is_valid(row),
            CanonicalColumn::Money(a) => a.is_valid(row),
            CanonicalColumn::Flag(a) => a.is_valid(row),
        }
    }
}

/// The columns of a mapped batch of `entity`, in field order, each with its field kind.
pub fn canonical_columns(
    entity: Entity,
    batch: &RecordBatch,
) -> Vec<(FieldKind, CanonicalColumn<'_>)> {
    entity
        .fields()
        .iter()
        .map(|f| {
            let column = match f.kind {
                FieldKind::Text
                | FieldKind::Currency
                | FieldKind::Choice(_)
                | FieldKind::IdList => CanonicalColumn::Text(strings(batch, f.name)),
                FieldKind::Date => CanonicalColumn::Date(dates(batch, f.name)),
                FieldKind::Timestamp => CanonicalColumn::Instant(timestamps(batch, f.name)),
                FieldKind::Money => CanonicalColumn::Money(money(batch, f.name)),
                FieldKind::Flag => CanonicalColumn::Flag(flags(batch, f.name)),
            };
            (f.kind, column)
        })
        .collect()
}
