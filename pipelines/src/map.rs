//! The map stage: source columns -> the canonical schema of an entity. Parsing happens here
//! (dates, exact decimals, currency codes, enum words, flags) and a cell that does not parse
//! becomes a [`CellError`] on its row, never a failed batch.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Schema};
use sluice_engine::entity::{Absent, Entity, FieldKind, FieldSpec};
use sluice_engine::money::{DecimalFormat, MONEY_PRECISION, MONEY_SCALE, parse_amount};
use sluice_engine::time::{TimeFormat, parse_date, parse_timestamp};
use sluice_engine::validate::{CellError, rule};

use crate::error::PipelineError;

/// Where a canonical field's values come from.
#[derive(Debug, Clone)]
enum Origin {
    /// A source column, by index.
    Column(usize),
    /// The source has no such column.
    Absent,
}

/// A mapping resolved against one source schema.
#[derive(Debug, Clone)]
pub struct Mapper {
    entity: Entity,
    origins: Vec<Origin>,
    decimal: DecimalFormat,
    time: TimeFormat,
    soft_delete: Option<usize>,
}

/// A mapped batch: canonical columns and, per row, what failed to parse.
#[derive(Debug)]
pub struct MappedBatch {
    /// Columns of `entity.schema()`.
    pub rows: RecordBatch,
    /// Per row, the cells that could not be read.
    pub issues: Vec<Vec<CellError>>,
    /// Per row, when the source marks it deleted (empty without a soft-delete column).
    pub deleted_at: Vec<Option<i64>>,
}

impl Mapper {
    /// Resolves `mapping` (canonical field -> source column) against `schema`. Unmapped
    /// fields match a column of the same name (exactly, else ignoring case). Fails when a
    /// mapped column does not exist, a column is not text, or a required field without a
    /// default has no column at all (every row would be rejected).
    pub fn new(
        entity: Entity,
        mapping: &BTreeMap<String, String>,
        required: &[&str],
        schema: &Schema,
        decimal: DecimalFormat,
        time: TimeFormat,
    ) -> Result<Self, PipelineError> {
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut origins = Vec::with_capacity(entity.fields().len());
        for spec in entity.fields() {
            let origin = match mapping.get(spec.name) {
                Some(col) => match columns.iter().position(|c| c == col) {
                    Some(i) => Origin::Column(i),
                    None => {
                        return Err(PipelineError::config(format!(
                            "[mapping] {} = {col:?}: the source has no column {col:?}; its columns are: {}",
                            spec.name,
                            columns.join(", ")
                        )));
                    }
                },
                None => find_column(&columns, spec.name).map_or(Origin::Absent, Origin::Column),
            };
            if let Origin::Column(i) = origin {
                let ty = schema.field(i).data_type();
                if !readable_type(ty) {
                    return Err(PipelineError::config(format!(
                        "source column {:?} (for {}) is {ty}, which the map stage does not read",
                        columns[i], spec.name
                    )));
                }
            }
            if matches!(origin, Origin::Absent)
                && spec.absent == Absent::Null
                && (spec.required || required.contains(&spec.name))
            {
                return Err(PipelineError::config(format!(
                    "the source has no column for required field '{}'; its columns are: {}. Add `{} = \"<column>\"` under [mapping]",
                    spec.name,
                    columns.join(", "),
                    spec.name
                )));
            }
            origins.push(origin);
        }
        Ok(Mapper {
            entity,
            origins,
            decimal,
            time,
            soft_delete: None,
        })
    }

    /// Reads deletions from `column`: a timestamp (the row is deleted when it is set) or a
    /// boolean (deleted when true, as of the row's `updated_at`, else as of now).
    pub fn with_soft_delete(
        mut self,
        column: &str,
        schema: &Schema,
    ) -> Result<Self, PipelineError> {
        let i = schema
            .fields()
            .iter()
            .position(|f| f.name() == column)
            .ok_or_else(|| {
                PipelineError::config(format!(
                    "soft_delete column {column:?} is not a column of the source"
                ))
            })?;
        match schema.field(i).data_type() {
            DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, _) | DataType::Boolean => {}
            other => {
                return Err(PipelineError::config(format!(
                    "soft_delete column {column:?} is {other}; it must be a timestamp or a boolean"
                )));
            }
        }
        self.soft_delete = Some(i);
        Ok(self)
    }

    /// Maps one batch of source records.
    pub fn map(&self, records: &RecordBatch) -> MappedBatch {
        let n = records.num_rows();
        let mut issues: Vec<Vec<CellError>> = vec![Vec::new(); n];
        let fields = self.entity.fields();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(fields.len());
        for (spec, origin) in fields.iter().zip(&self.origins) {
            if let Origin::Column(i) = origin
                && let Some(mapped) = typed_column(spec, records.column(*i).as_ref(), &mut issues)
            {
                columns.push(mapped);
                continue;
            }
            // Other typed source columns are rendered as exact text once per batch and
            // parsed like any other cell, so every source obeys the same rules.
            let rendered;
            let source = match origin {
                Origin::Column(i) => {
                    let column = records.column(*i);
                    match column.as_any().downcast_ref::<StringArray>() {
                        Some(text) => Some(text),
                        None => {
                            rendered = text_column(column.as_ref());
                            Some(&rendered)
                        }
                    }
                }
                Origin::Absent => None,
            };
            columns.push(self.map_column(spec, source, n, &mut issues));
        }
        if let Some(pos) = fields
            .iter()
            .position(|f| f.absent == Absent::StatusFromBalance)
        {
            columns[pos] = derive_status(&columns[pos], &columns, fields);
        }
        // The canonical schema is fixed by the entity and every column is built to it.
        let rows = RecordBatch::try_new(self.entity.schema(), columns)
            .unwrap_or_else(|e| unreachable_schema(self.entity, e));
        let deleted_at = self
            .soft_delete
            .map(|i| deletions(records.column(i).as_ref(), &rows))
            .unwrap_or_default();
        MappedBatch {
            rows,
            issues,
            deleted_at,
        }
    }

    fn map_column(
        &self,
        spec: &FieldSpec,
        source: Option<&StringArray>,
        n: usize,
        issues: &mut [Vec<CellError>],
    ) -> ArrayRef {
        let cell = |row: usize| -> Option<&str> {
            let a = source?;
            if a.is_null(row) {
                return None;
            }
            let v = a.value(row).trim();
            (!v.is_empty()).then_some(v)
        };
        let default = match spec.absent {
            Absent::Value(v) => Some(v),
            _ => None,
        };
        let mut fail = |row: usize, rule: &str, value: &str, message: &str| {
            issues[row].push(CellError::new(
                spec.name,
                rule,
                Some(value.to_string()),
                message,
            ));
        };
        match spec.kind {
            FieldKind::Text => {
                let mut b = StringBuilder::with_capacity(n, n * 8);
                for row in 0..n {
                    b.append_option(cell(row));
                }
                Arc::new(b.finish())
            }
            FieldKind::Currency => {
                let mut b = StringBuilder::with_capacity(n, n * 3);
                for row in 0..n {
                    b.append_option(cell(row).map(upper));
                }
                Arc::new(b.finish())
            }
            FieldKind::Choice(_) => {
                let mut b = StringBuilder::with_capacity(n, n * 6);
                for row in 0..n {
                    b.append_option(cell(row).map(choice_word).or(default.map(Cow::Borrowed)));
                }
                Arc::new(b.finish())
            }
            FieldKind::IdList => {
                let mut b = StringBuilder::with_capacity(n, n * 8);
                for row in 0..n {
                    match cell(row).map(id_list) {
                        Some(Ok(json)) => b.append_value(json),
                        Some(Err(())) => {
                            fail(
                                row,
                                "id_list_format",
                                cell(row).unwrap_or_default(),
                                "not a list of ids: use `A;B` or a JSON array of strings",
                            );
                            b.append_null();
                        }
                        None => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            FieldKind::Flag => {
                let mut b = BooleanBuilder::with_capacity(n);
                for row in 0..n {
                    match cell(row).or(default) {
                        Some(v) => match parse_flag(v) {
                            Some(f) => b.append_value(f),
                            None => {
                                fail(
                                    row,
                                    rule::BOOLEAN_FORMAT,
                                    v,
                                    "not a yes/no value: use true/false, yes/no or 1/0",
                                );
                                b.append_null();
                            }
                        },
                        None => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            FieldKind::Date => {
                let mut b = Date32Builder::with_capacity(n);
                for row in 0..n {
                    match cell(row) {
                        Some(v) => match parse_date(v, &self.time) {
                            Some(d) => b.append_value(d),
                            None => {
                                fail(
                                    row,
                                    rule::DATE_FORMAT,
                                    v,
                                    "not a date: use YYYY-MM-DD, a format declared in [format] date_formats, or an Excel serial",
                                );
                                b.append_null();
                            }
                        },
                        None => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            FieldKind::Timestamp => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
                for row in 0..n {
                    match cell(row) {
                        Some(v) => match parse_timestamp(v, &self.time) {
                            Some(t) => b.append_value(t),
                            None => {
                                fail(
                                    row,
                                    rule::TIMESTAMP_FORMAT,
                                    v,
                                    "not a timestamp: use RFC 3339 (2024-01-31T12:00:00Z) or a format declared in [format] timestamp_formats",
                                );
                                b.append_null();
                            }
                        },
                        None => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            FieldKind::Money => {
                let mut b = Decimal128Builder::with_capacity(n)
                    .with_precision_and_scale(MONEY_PRECISION, MONEY_SCALE as i8)
                    .unwrap_or_else(|_| Decimal128Builder::with_capacity(n));
                for row in 0..n {
                    match cell(row) {
                        Some(v) => match parse_amount(v, self.decimal) {
                            Ok(units) => b.append_value(units),
                            Err(e) => {
                                fail(row, rule::DECIMAL_FORMAT, v, e.message());
                                b.append_null();
                            }
                        },
                        None => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
        }
    }
}

/// Maps a typed source column straight onto a canonical one of a compatible type (dates,
/// instants, exact decimals, integers as amounts, booleans) without a round trip through
/// text. `None` when there is no direct path; the caller renders and parses instead.
fn typed_column(
    spec: &FieldSpec,
    array: &dyn Array,
    issues: &mut [Vec<CellError>],
) -> Option<ArrayRef> {
    use arrow_array::{
        BooleanArray, Date32Array, Decimal128Array, Int64Array, TimestampMicrosecondArray,
    };
    const DAY_MICROS: i64 = 86_400_000_000;
    let any = array.as_any();
    let n = array.len();
    match spec.kind {
        FieldKind::Date => {
            if let Some(a) = any.downcast_ref::<Date32Array>() {
                return Some(Arc::new(a.clone()));
            }
            let a = any.downcast_ref::<TimestampMicrosecondArray>()?;
            let mut b = Date32Builder::with_capacity(n);
            for r in 0..n {
                b.append_option(
                    a.is_valid(r)
                        .then(|| a.value(r).div_euclid(DAY_MICROS) as i32),
                );
            }
            Some(Arc::new(b.finish()))
        }
        FieldKind::Timestamp => {
            if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
                return Some(Arc::new(a.clone().with_timezone("UTC")));
            }
            let a = any.downcast_ref::<Date32Array>()?;
            let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
            for r in 0..n {
                b.append_option(a.is_valid(r).then(|| i64::from(a.value(r)) * DAY_MICROS));
            }
            Some(Arc::new(b.finish()))
        }
        FieldKind::Money => {
            let mut b = Decimal128Builder::with_capacity(n)
                .with_precision_and_scale(MONEY_PRECISION, MONEY_SCALE as i8)
                .unwrap_or_else(|_| Decimal128Builder::with_capacity(n));
            let max_units: i128 = 999_999_999_999_999_999;
            let mut push = |r: usize,
                            units: Result<i128, &'static str>,
                            b: &mut Decimal128Builder| match units {
                Ok(u) if u.abs() <= max_units => b.append_value(u),
                Ok(_) => {
                    issues[r].push(CellError::new(
                        spec.name,
                        rule::DECIMAL_FORMAT,
                        cell_text(array, r),
                        "amount exceeds 14 integer digits",
                    ));
                    b.append_null();
                }
                Err(message) => {
                    issues[r].push(CellError::new(
                        spec.name,
                        rule::DECIMAL_FORMAT,
                        cell_text(array, r),
                        message,
                    ));
                    b.append_null();
                }
            };
            if let Some(a) = any.downcast_ref::<Decimal128Array>() {
                let scale = i32::from(a.scale());
                for r in 0..n {
                    if a.is_null(r) {
                        b.append_null();
                        continue;
                    }
                    let v = a.value(r);
                    let units = if scale <= 4 {
                        v.checked_mul(10i128.pow((4 - scale) as u32))
                            .ok_or("amount out of range")
                    } else {
                        let div = 10i128.pow((scale - 4) as u32);
                        if v % div == 0 {
                            Ok(v / div)
                        } else {
                            Err("more than 4 decimal places; amounts are never rounded")
                        }
                    };
                    push(r, units, &mut b);
                }
                return Some(Arc::new(b.finish()));
            }
            let a = any.downcast_ref::<Int64Array>()?;
            for r in 0..n {
                if a.is_null(r) {
                    b.append_null();
                } else {
                    push(r, Ok(i128::from(a.value(r)) * 10_000), &mut b);
                }
            }
            Some(Arc::new(b.finish()))
        }
        // Nulls in a flag take the field's default: leave those to the text path.
        FieldKind::Flag => any
            .downcast_ref::<BooleanArray>()
            .filter(|a| a.null_count() == 0)
            .map(|a| Arc::new(a.clone()) as ArrayRef),
        _ => None,
    }
}

/// Deletion instants from a soft-delete column (see [`Mapper::with_soft_delete`]).
fn deletions(column: &dyn Array, rows: &RecordBatch) -> Vec<Option<i64>> {
    use arrow_array::{BooleanArray, TimestampMicrosecondArray};
    let any = column.as_any();
    if let Some(at) = any.downcast_ref::<TimestampMicrosecondArray>() {
        return (0..at.len())
            .map(|r| at.is_valid(r).then(|| at.value(r)))
            .collect();
    }
    let Some(flags) = any.downcast_ref::<BooleanArray>() else {
        return Vec::new();
    };
    let updated = sluice_engine::validate::timestamps(rows, "updated_at");
    let now = chrono::Utc::now().timestamp_micros();
    (0..flags.len())
        .map(|r| {
            (flags.is_valid(r) && flags.value(r)).then(|| {
                if updated.is_valid(r) {
                    updated.value(r)
                } else {
                    now
                }
            })
        })
        .collect()
}

fn readable_type(ty: &DataType) -> bool {
    matches!(
        ty,
        DataType::Utf8
            | DataType::Int64
            | DataType::Decimal128(_, _)
            | DataType::Date32
            | DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, _)
            | DataType::Boolean
    )
}

/// A typed cell as exact text: integers and decimals as written, dates as `YYYY-MM-DD`,
/// instants as RFC 3339 UTC, booleans as `true`/`false`. `None` for a null or a type the
/// map stage does not read.
pub fn cell_text(array: &dyn Array, row: usize) -> Option<String> {
    use arrow_array::{
        BooleanArray, Date32Array, Decimal128Array, Int64Array, TimestampMicrosecondArray,
    };
    if array.is_null(row) {
        return None;
    }
    let any = array.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        Some(a.value(row).to_string())
    } else if let Some(a) = any.downcast_ref::<Int64Array>() {
        Some(a.value(row).to_string())
    } else if let Some(a) = any.downcast_ref::<Decimal128Array>() {
        Some(decimal_text(a.value(row), a.scale()))
    } else if let Some(a) = any.downcast_ref::<Date32Array>() {
        Some(sluice_engine::time::format_date(a.value(row)))
    } else if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
        Some(sluice_engine::time::format_timestamp(a.value(row)))
    } else {
        any.downcast_ref::<BooleanArray>()
            .map(|a| a.value(row).to_string())
    }
}

/// An unscaled integer with `scale` decimals, as exact text (`12345`, 2 -> `123.45`).
fn decimal_text(value: i128, scale: i8) -> String {
    if scale <= 0 {
        return format!("{value}{}", "0".repeat(scale.unsigned_abs() as usize));
    }
    let digits = value.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
    } else {
        digits
    };
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{}{int}.{frac}", if value < 0 { "-" } else { "" })
}

fn text_column(array: &dyn Array) -> StringArray {
    (0..array.len()).map(|row| cell_text(array, row)).collect()
}

#[allow(clippy::panic)]
fn unreachable_schema(entity: Entity, e: arrow_schema::ArrowError) -> RecordBatch {
    panic!("map stage built columns that do not match the {entity} schema: {e}")
}

fn find_column(columns: &[&str], name: &str) -> Option<usize> {
    columns.iter().position(|c| *c == name).or_else(|| {
        let mut matches = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.eq_ignore_ascii_case(name));
        match (matches.next(), matches.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    })
}

fn upper(v: &str) -> Cow<'_, str> {
    if v.bytes().any(|b| b.is_ascii_lowercase()) {
        Cow::Owned(v.to_ascii_uppercase())
    } else {
        Cow::Borrowed(v)
    }
}

/// `Credit Note`, `credit-note` and `CREDIT_NOTE` all mean `credit_note`.
fn choice_word(v: &str) -> Cow<'_, str> {
    if v.bytes()
        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
    {
        Cow::Borrowed(v)
    } else {
        Cow::Owned(
            v.chars()
                .map(|c| {
                    if c == ' ' || c == '-' {
                        '_'
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect(),
        )
    }
}

fn parse_flag(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// `A;B`, `A, B` or `["A","B"]` -> `["A","B"]`.
fn id_list(v: &str) -> Result<String, ()> {
    let ids: Vec<String> = if v.starts_with('[') {
        serde_json::from_str::<Vec<String>>(v).map_err(|_| ())?
    } else {
        v.split([';', ','])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    serde_json::to_string(&ids).map_err(|_| ())
}

/// Fills empty statuses from the balance: `open` while something is owed, else `paid`.
fn derive_status(status: &ArrayRef, columns: &[ArrayRef], fields: &[FieldSpec]) -> ArrayRef {
    let Some(balance_pos) = fields.iter().position(|f| f.name == "balance") else {
        return status.clone();
    };
    let balance = columns[balance_pos]
        .as_any()
        .downcast_ref::<arrow_array::Decimal128Array>();
    let status_arr = status.as_any().downcast_ref::<StringArray>();
    let (Some(balance), Some(status_arr)) = (balance, status_arr) else {
        return status.clone();
    };
    if status_arr.null_count() == 0 {
        return status.clone();
    }
    let mut b = StringBuilder::with_capacity(status_arr.len(), status_arr.len() * 4);
    for row in 0..status_arr.len() {
        if status_arr.is_valid(row) {
            b.append_value(status_arr.value(row));
        } else if balance.is_valid(row) {
            b.append_value(if balance.value(row) > 0 {
                "open"
            } else {
                "paid"
            });
        } else {
            b.append_null();
        }
    }
    Arc::new(b.finish())
}

#[cfg(test)]
mod tests {
    use arrow_array::{Array, Decimal128Array, StringArray};
    use arrow_schema::{Field, Schema};
    use sluice_engine::validate::{dates, strings};

    use super::*;

    fn batch(cols: &[(&str, Vec<Option<&str>>)]) -> RecordBatch {
        let schema = Schema::new(
            cols.iter()
                .map(|(n, _)| Field::new(*n, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        );
        let arrays: Vec<ArrayRef> = cols
            .iter()
            .map(|(_, v)| Arc::new(StringArray::from(v.clone())) as ArrayRef)
            .collect();
        RecordBatch::try_new(Arc::new(schema), arrays).expect("batch")
    }

    fn mapper(
        b: &RecordBatch,
        mapping: &[(&str, &str)],
        decimal: DecimalFormat,
        time: TimeFormat,
    ) -> Result<Mapper, PipelineError> {
        let mapping = mapping
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Mapper::new(Entity::Invoices, &mapping, &[], &b.schema(), decimal, time)
    }

    #[test]
    fn european_numbers_declared_dates_and_derived_fields() {
        let b = batch(&[
            ("Nr", vec![Some("A"), Some("B"), Some("C")]),
            (
                "Datum",
                vec![Some("31.01.2024"), Some("2024-02-01"), Some("45322")],
            ),
            (
                "Faellig",
                vec![Some("29.02.2024"), Some("bad"), Some("01.03.2024")],
            ),
            ("CURRENCY", vec![Some("eur"), Some(" EUR "), Some("EUR")]),
            ("Total", vec![Some("1.234,50"), Some("10"), Some("1,2,3")]),
            ("Balance", vec![Some("0"), Some("10"), Some("0")]),
            ("Kind", vec![Some("Credit Note"), None, Some("INVOICE")]),
        ]);
        let decimal = DecimalFormat {
            decimal_separator: b',',
            thousands_separator: Some(b'.'),
        };
        let time = TimeFormat {
            date_formats: vec!["%d.%m.%Y".into()],
            ..Default::default()
        };
        let m = mapper(
            &b,
            &[
                ("external_id", "Nr"),
                ("issue_date", "Datum"),
                ("due_date", "Faellig"),
            ],
            decimal,
            time,
        )
        .expect("mapper");
        let out = m.map(&b);
        let total = out
            .rows
            .column_by_name("total")
            .and_then(|c| c.as_any().downcast_ref::<Decimal128Array>().cloned())
            .expect("total");
        assert_eq!(total.value(0), 12_345_000);
        assert!(total.is_null(2));
        assert_eq!(
            strings(&out.rows, "currency").value(1),
            "EUR",
            "trimmed, upper-cased, matched case-insensitively"
        );
        assert_eq!(strings(&out.rows, "kind").value(0), "credit_note");
        assert_eq!(
            strings(&out.rows, "kind").value(1),
            "invoice",
            "absent kind defaults to invoice"
        );
        assert_eq!(strings(&out.rows, "kind").value(2), "invoice");
        assert_eq!(
            strings(&out.rows, "status").value(0),
            "paid",
            "no status column: derived from the balance"
        );
        assert_eq!(strings(&out.rows, "status").value(1), "open");
        assert_eq!(
            dates(&out.rows, "issue_date").value(2),
            dates(&out.rows, "issue_date").value(0),
            "Excel serial 45322 is 2024-01-31"
        );
        assert!(out.issues[0].is_empty());
        assert_eq!(out.issues[1].len(), 1);
        assert_eq!(
            (
                out.issues[1][0].field.as_str(),
                out.issues[1][0].rule.as_str()
            ),
            ("due_date", "date_format")
        );
        assert_eq!(out.issues[1][0].value.as_deref(), Some("bad"));
        assert_eq!(out.issues[2][0].rule, "decimal_format");
    }

    #[test]
    fn decimals_render_exactly() {
        assert_eq!(decimal_text(12345, 2), "123.45");
        assert_eq!(decimal_text(-5, 3), "-0.005");
        assert_eq!(decimal_text(7, 0), "7");
        assert_eq!(decimal_text(0, 4), "0.0000");
    }

    #[test]
    fn a_required_field_with_no_column_stops_the_run_before_reading() {
        let b = batch(&[("id", vec![Some("1")]), ("total", vec![Some("1")])]);
        let err = mapper(&b, &[], DecimalFormat::default(), TimeFormat::default())
            .expect_err("no external_id column");
        assert!(
            err.message().contains("required field 'external_id'")
                && err.message().contains("id, total"),
            "{err}"
        );
        let err = mapper(
            &b,
            &[("external_id", "ID_")],
            DecimalFormat::default(),
            TimeFormat::default(),
        )
        .expect_err("unknown column");
        assert!(err.message().contains("no column \"ID_\""), "{err}");
    }
}
