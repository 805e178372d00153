//! Validation: the built-in rules of each entity, applied to a mapped batch. A failing row is
//! never dropped: each failure becomes a [`CellError`] that travels with the row into
//! quarantine. Rule sets are versioned by a hash that every run records, so a quarantined row
//! can always be traced to the exact rules that rejected it.

use std::collections::BTreeSet;

use arrow_array::{
    Array, BooleanArray, Date32Array, Decimal128Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::currency::is_iso_4217;
use crate::entity::{Entity, FieldKind};
use crate::error::{EngineError, ErrorKind, Result};

/// One reason a row was rejected: which field, which rule, the offending value, and a
/// sentence for the person who fixes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CellError {
    /// The canonical field (or source column, for rows that never reached mapping).
    pub field: String,
    /// The rule's stable name, e.g. `balance_within_total`.
    pub rule: String,
    /// The value as the source wrote it, when there was one.
    pub value: Option<String>,
    /// What is wrong and what would be right.
    pub message: String,
}

impl CellError {
    /// A new error.
    pub fn new(
        field: impl Into<String>,
        rule: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        CellError {
            field: field.into(),
            rule: rule.into(),
            value,
            message: message.into(),
        }
    }
}

/// Rule names, stable: they appear in quarantine records, filters and the API.
pub mod rule {
    /// A required field is empty or missing.
    pub const REQUIRED: &str = "required";
    /// A date cell is not a date in any accepted format.
    pub const DATE_FORMAT: &str = "date_format";
    /// A timestamp cell is not an instant in any accepted format.
    pub const TIMESTAMP_FORMAT: &str = "timestamp_format";
    /// An amount is not an exact decimal in the declared format.
    pub const DECIMAL_FORMAT: &str = "decimal_format";
    /// A flag is not true/false.
    pub const BOOLEAN_FORMAT: &str = "boolean_format";
    /// A currency is not an ISO 4217 code.
    pub const CURRENCY_CODE: &str = "currency_code";
    /// A value is not one of the field's allowed words.
    pub const ALLOWED_VALUES: &str = "allowed_values";
    /// A document is due before it was issued.
    pub const DUE_NOT_BEFORE_ISSUE: &str = "due_not_before_issue";
    /// A document total is negative (credit notes are a kind, not a sign).
    pub const TOTAL_NON_NEGATIVE: &str = "total_non_negative";
    /// A document's open balance is below zero or above its total.
    pub const BALANCE_WITHIN_TOTAL: &str = "balance_within_total";
    /// A payment's amount is zero or negative.
    pub const AMOUNT_POSITIVE: &str = "amount_positive";
    /// A source record had a different number of cells than the header.
    pub const RAGGED_ROW: &str = "ragged_row";
    /// A source record could not be decoded.
    pub const UNREADABLE_RECORD: &str = "unreadable_record";
}

/// Rules that a pipeline may switch off in its `[rules]` table.
pub const OPTIONAL_RULES: &[&str] = &[
    rule::CURRENCY_CODE,
    rule::DUE_NOT_BEFORE_ISSUE,
    rule::TOTAL_NON_NEGATIVE,
    rule::BALANCE_WITHIN_TOTAL,
    rule::AMOUNT_POSITIVE,
];

/// A pipeline's adjustments to the built-in rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleOverrides {
    /// Rules switched off (only those in [`OPTIONAL_RULES`]).
    #[serde(default)]
    pub disable: Vec<String>,
    /// Fields that become required in addition to the built-in ones.
    #[serde(default)]
    pub require: Vec<String>,
}

/// The rules applied to one entity, after overrides.
#[derive(Debug, Clone)]
pub struct RuleSet {
    entity: Entity,
    disabled: BTreeSet<String>,
    required: BTreeSet<&'static str>,
}

/// Version of the built-in rules; bump it whenever a rule's behaviour changes.
const RULES_VERSION: &str = "sluice-rules/1";

impl RuleSet {
    /// The built-in rules of `entity` adjusted by `overrides`; unknown names are errors.
    pub fn new(entity: Entity, overrides: &RuleOverrides) -> Result<Self> {
        let mut disabled = BTreeSet::new();
        for name in &overrides.disable {
            if !OPTIONAL_RULES.contains(&name.as_str()) {
                return Err(EngineError::new(
                    ErrorKind::Config,
                    format!(
                        "[rules] disable: '{name}' cannot be switched off; rules that can: {}",
                        OPTIONAL_RULES.join(", ")
                    ),
                ));
            }
            disabled.insert(name.clone());
        }
        let mut required: BTreeSet<&'static str> = entity
            .fields()
            .iter()
            .filter(|f| f.required)
            .map(|f| f.name)
            .collect();
        for name in &overrides.require {
            let field = entity.field(name).ok_or_else(|| {
                EngineError::new(
                    ErrorKind::Config,
                    format!("[rules] require: {entity} have no field '{name}'"),
                )
            })?;
            required.insert(field.name);
        }
        Ok(RuleSet {
            entity,
            disabled,
            required,
        })
    }

    /// Whether a rule is in force.
    pub fn enabled(&self, rule: &str) -> bool {
        !self.disabled.contains(rule)
    }

    /// A stable hash of exactly what this rule set checks.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(RULES_VERSION);
        h.update(b"|");
        h.update(self.entity.name());
        for r in &self.disabled {
            h.update(b"|-");
            h.update(r);
        }
        for f in &self.required {
            h.update(b"|+");
            h.update(f);
        }
        let digest = h.finalize();
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Checks every row of a mapped batch, appending failures to `issues[row]`.
    ///
    /// `issues` already holds the map stage's parse errors; a field that failed to parse is
    /// not reported again as missing.
    pub fn validate(&self, batch: &RecordBatch, issues: &mut [Vec<CellError>]) {
        let fields = self.entity.fields();
        for (col, spec) in fields.iter().enumerate() {
            let array = batch.column(col);
            if self.required.contains(spec.name) {
                for (row, errs) in issues.iter_mut().enumerate() {
                    if array.is_null(row) && !errs.iter().any(|e| e.field == spec.name) {
                        errs.push(CellError::new(
                            spec.name,
                            rule::REQUIRED,
                            None,
                            format!("{} is required", spec.name),
                        ));
                    }
                }
            }
            match spec.kind {
                FieldKind::Currency if self.enabled(rule::CURRENCY_CODE) => {
                    let codes = as_strings(array);
                    for (row, errs) in issues.iter_mut().enumerate() {
                        if codes.is_valid(row) && !is_iso_4217(codes.value(row)) {
                            errs.push(CellError::new(
                                spec.name,
                                rule::CURRENCY_CODE,
                                Some(codes.value(row).to_string()),
                                "not an ISO 4217 currency code (e.g. USD, EUR, GBP)",
                            ));
                        }
                    }
                }
                FieldKind::Choice(allowed) => {
                    let words = as_strings(array);
                    for (row, errs) in issues.iter_mut().enumerate() {
                        if words.is_valid(row) && !allowed.contains(&words.value(row)) {
                            errs.push(CellError::new(
                                spec.name,
                                rule::ALLOWED_VALUES,
                                Some(words.value(row).to_string()),
                                format!("must be one of: {}", allowed.join(", ")),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        if self.entity.is_document() {
            self.validate_documents(batch, issues);
        }
        if self.entity == Entity::Payments && self.enabled(rule::AMOUNT_POSITIVE) {
            let amount = money(batch, "amount");
            for (row, errs) in issues.iter_mut().enumerate() {
                if amount.is_valid(row) && amount.value(row) <= 0 {
                    errs.push(CellError::new(
                        "amount",
                        rule::AMOUNT_POSITIVE,
                        Some(crate::money::format_units(amount.value(row))),
                        "a payment's amount must be greater than zero; direction says in or out",
                    ));
                }
            }
        }
    }

    fn validate_documents(&self, batch: &RecordBatch, issues: &mut [Vec<CellError>]) {
        let issue = dates(batch, "issue_date");
        let due = dates(batch, "due_date");
        let total = money(batch, "total");
        let balance = money(batch, "balance");
        for (row, errs) in issues.iter_mut().enumerate() {
            if self.enabled(rule::DUE_NOT_BEFORE_ISSUE)
                && issue.is_valid(row)
                && due.is_valid(row)
                && due.value(row) < issue.value(row)
            {
                errs.push(CellError::new(
                    "due_date",
                    rule::DUE_NOT_BEFORE_ISSUE,
                    Some(crate::time::format_date(due.value(row))),
                    format!(
                        "due date is before the issue date {}",
                        crate::time::format_date(issue.value(row))
                    ),
                ));
            }
            if self.enabled(rule::TOTAL_NON_NEGATIVE) && total.is_valid(row) && total.value(row) < 0
            {
                errs.push(CellError::new(
                    "total",
                    rule::TOTAL_NON_NEGATIVE,
                    Some(crate::money::format_units(total.value(row))),
                    "total must not be negative; record a credit note with kind = credit_note",
                ));
            }
            if self.enabled(rule::BALANCE_WITHIN_TOTAL)
                && balance.is_valid(row)
                && total.is_valid(row)
                && (balance.value(row) < 0 || balance.value(row) > total.value(row))
            {
                errs.push(CellError::new(
                    "balance",
                    rule::BALANCE_WITHIN_TOTAL,
                    Some(crate::money::format_units(balance.value(row))),
                    format!(
                        "open balance must be between 0 and the total {}",
                        crate::money::format_units(total.value(row))
                    ),
                ));
            }
        }
    }
}

// Downcasts of canonical columns. The canonical schema fixes every column's type, so a
// mismatch is a bug in the map stage, not bad input; it panics in tests and reads as empty.

fn as_strings(array: &dyn Array) -> &StringArray {
    array
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap_or_else(|| empty_strings())
}

fn empty_strings() -> &'static StringArray {
    static EMPTY: std::sync::OnceLock<StringArray> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| StringArray::from(Vec::<Option<&str>>::new()))
}

/// The Decimal128 column `name` of a canonical batch.
pub fn money<'a>(batch: &'a RecordBatch, name: &str) -> &'a Decimal128Array {
    typed(batch, name)
}

/// The Date32 column `name` of a canonical batch.
pub fn dates<'a>(batch: &'a RecordBatch, name: &str) -> &'a Date32Array {
    typed(batch, name)
}

/// The Utf8 column `name` of a canonical batch.
pub fn strings<'a>(batch: &'a RecordBatch, name: &str) -> &'a StringArray {
    typed(batch, name)
}

/// The timestamp column `name` of a canonical batch.
pub fn timestamps<'a>(batch: &'a RecordBatch, name: &str) -> &'a TimestampMicrosecondArray {
    typed(batch, name)
}

/// The Boolean column `name` of a canonical batch.
pub fn flags<'a>(batch: &'a RecordBatch, name: &str) -> &'a BooleanArray {
    typed(batch, name)
}

#[allow(clippy::panic)]
fn typed<'a, T: Array + 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .unwrap_or_else(|| panic!("canonical column {name} missing or mistyped: map stage bug"))
}
