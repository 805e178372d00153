//! In-batch dedupe and row fingerprints. Within a batch, rows sharing an `external_id`
//! collapse to one: the latest `updated_at` wins and, on a tie, the later source position
//! (rows arrive in source order). Across batches and runs the warehouse applies the same
//! order; see `Warehouse::commit_batch`. Rejected rows never take part: they are quarantined.

use std::collections::HashMap;

use arrow_array::{Array, RecordBatch};
use xxhash_rust::xxh3::xxh3_128;

use crate::columns::{CanonicalColumn, canonical_columns};
use crate::entity::Entity;
use crate::validate::{strings, timestamps};

/// Which rows of a batch go on to the load, and how many collapsed into them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deduplicated {
    /// Row indices to load, in source order; each `external_id` once.
    pub winners: Vec<u32>,
    /// Valid rows that lost to a later or newer row with the same `external_id`.
    pub deduplicated: u64,
}

/// Picks the winning row per `external_id` among the rows not marked `rejected`.
pub fn dedupe_batch(batch: &RecordBatch, rejected: &[bool]) -> Deduplicated {
    let ids = strings(batch, "external_id");
    let updated = timestamps(batch, "updated_at");
    let mut best: HashMap<&str, u32> = HashMap::with_capacity(batch.num_rows());
    let mut valid = 0u64;
    for (row, &bad) in rejected.iter().enumerate().take(batch.num_rows()) {
        if bad || ids.is_null(row) {
            continue;
        }
        valid += 1;
        let version = updated.is_valid(row).then(|| updated.value(row));
        best.entry(ids.value(row))
            .and_modify(|kept| {
                let k = *kept as usize;
                let kept_version = updated.is_valid(k).then(|| updated.value(k));
                // `>=`: a later row with the same version wins (source order breaks ties).
                if version >= kept_version {
                    *kept = row as u32;
                }
            })
            .or_insert(row as u32);
    }
    let mut winners: Vec<u32> = best.into_values().collect();
    winners.sort_unstable();
    let deduplicated = valid - winners.len() as u64;
    Deduplicated {
        winners,
        deduplicated,
    }
}

/// A 128-bit fingerprint of each listed row's canonical values, so the load can tell an
/// unchanged row from a changed one without comparing every column.
pub fn row_fingerprints(entity: Entity, batch: &RecordBatch, rows: &[u32]) -> Vec<u128> {
    let columns = canonical_columns(entity, batch);
    let mut buf = Vec::with_capacity(256);
    rows.iter()
        .map(|&row| {
            buf.clear();
            for (_, c) in &columns {
                write_cell(c, row as usize, &mut buf);
            }
            xxh3_128(&buf)
        })
        .collect()
}

/// Appends a self-delimiting encoding of the cell: a null and an empty string differ, and
/// adjacent cells cannot run into each other.
fn write_cell(column: &CanonicalColumn<'_>, row: usize, buf: &mut Vec<u8>) {
    if !column.is_valid(row) {
        buf.push(0);
        return;
    }
    buf.push(1);
    match column {
        CanonicalColumn::Text(a) => {
            let v = a.value(row).as_bytes();
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        }
        CanonicalColumn::Date(a) => buf.extend_from_slice(&a.value(row).to_le_bytes()),
        CanonicalColumn::Instant(a) => buf.extend_from_slice(&a.value(row).to_le_bytes()),
        CanonicalColumn::Money(a) => buf.extend_from_slice(&a.value(row).to_le_bytes()),
        CanonicalColumn::Flag(a) => buf.push(u8::from(a.value(row))),
    }
}
