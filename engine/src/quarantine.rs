//! Quarantined rows: every rejected record, kept with its raw source values, its errors, the
//! run that read it and where in the source it stood, until an admin fixes and replays it or
//! ignores it. Quarantine never loses a row: a rejected row is written in the same
//! transaction as the batch's loaded rows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::validate::CellError;

/// Where a record stood in its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SourcePosition {
    /// The file path, table or endpoint the record came from.
    pub location: String,
    /// The worksheet, for spreadsheets.
    pub sheet: Option<String>,
    /// The line (CSV, where the record starts), sheet row (XLSX) or record ordinal.
    pub row: u64,
}

/// A rejected record on its way into quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRecord {
    /// Where it came from.
    pub position: SourcePosition,
    /// Source column -> value, exactly as read (null for an empty cell).
    pub raw: Map<String, Value>,
    /// Every reason it was rejected.
    pub errors: Vec<CellError>,
}

/// Lifecycle of a quarantined row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineStatus {
    /// Waiting for an admin.
    Pending,
    /// Raw values edited, not yet replayed.
    Fixed,
    /// Replayed and loaded.
    Replayed,
    /// Set aside on purpose, with a reason.
    Ignored,
}

impl QuarantineStatus {
    /// The stored word.
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineStatus::Pending => "pending",
            QuarantineStatus::Fixed => "fixed",
            QuarantineStatus::Replayed => "replayed",
            QuarantineStatus::Ignored => "ignored",
        }
    }

    /// Parses a stored word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(QuarantineStatus::Pending),
            "fixed" => Some(QuarantineStatus::Fixed),
            "replayed" => Some(QuarantineStatus::Replayed),
            "ignored" => Some(QuarantineStatus::Ignored),
            _ => None,
        }
    }
}

/// A row in quarantine, as the CLI and API show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantinedRow {
    /// Stable id.
    pub id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The run that read it.
    pub run_id: String,
    /// The pipeline that read it.
    pub pipeline: String,
    /// The entity it was meant to become.
    pub entity: String,
    /// Where it stands in its lifecycle.
    pub status: QuarantineStatus,
    /// Where it came from.
    pub position: SourcePosition,
    /// Source column -> value.
    pub raw: Map<String, Value>,
    /// Why it was rejected.
    pub errors: Vec<CellError>,
    /// When it was quarantined.
    pub created_at: DateTime<Utc>,
}

/// Which quarantined rows to list.
#[derive(Debug, Clone, Default)]
pub struct QuarantineFilter {
    /// Only rows read by this run.
    pub run_id: Option<String>,
    /// Only rows in this state.
    pub status: Option<QuarantineStatus>,
    /// Only rows that failed this rule.
    pub rule: Option<String>,
    /// At most this many (default 100).
    pub limit: Option<u32>,
    /// Only rows of this pipeline.
    pub pipeline: Option<String>,
    /// Only rows meant to become this entity.
    pub entity: Option<String>,
    /// Only rows with an error on this field.
    pub field: Option<String>,
    /// Only rows after this one (the id of the last row of the previous page).
    pub after: Option<String>,
}

/// Counts of quarantined rows by rule, field and status (a row with two errors counts once
/// per rule and field it failed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuarantineStats {
    /// Rows per rule.
    pub by_rule: std::collections::BTreeMap<String, u64>,
    /// Rows per field.
    pub by_field: std::collections::BTreeMap<String, u64>,
    /// Rows per status.
    pub by_status: std::collections::BTreeMap<String, u64>,
    /// Rows still open (pending or fixed) per pipeline.
    #[serde(default)]
    pub open_by_pipeline: std::collections::BTreeMap<String, u64>,
    /// Rows still open (pending or fixed) per rule they broke (a row that broke two rules
    /// counts under each).
    #[serde(default)]
    pub open_by_rule: std::collections::BTreeMap<String, u64>,
}

/// The stored form of raw values: their JSON text (source column order) and its hash.
pub fn raw_text_and_hash(raw: &Map<String, Value>) -> (String, String) {
    let text = Value::Object(raw.clone()).to_string();
    let hash = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()));
    (text, hash)
}
