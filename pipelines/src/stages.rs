//! Map, validate and dedupe one source batch into a [`LoadBatch`]: the CPU-bound part of a
//! run, kept free of I/O so it runs on a blocking thread and benchmarks in isolation.

use arrow_array::RecordBatch;
use serde_json::{Map, Value};
use sluice_connectors::SourceBatch;
use sluice_engine::dedupe::{dedupe_batch, row_fingerprints};
use sluice_engine::quarantine::{QuarantineRecord, SourcePosition};
use sluice_engine::validate::{CellError, RuleSet};
use sluice_engine::warehouse::LoadBatch;

use crate::map::Mapper;

/// Turns a source batch into rows to load and rows to quarantine. Every record of the
/// batch ends up in exactly one of: `load`, `quarantine`, or the `deduplicated` count.
pub fn prepare_batch(
    mapper: &Mapper,
    rules: &RuleSet,
    entity: sluice_engine::Entity,
    batch: SourceBatch,
) -> LoadBatch {
    let rows_read = batch.records_read();
    let mut mapped = mapper.map(&batch.records);
    rules.validate(&mapped.rows, &mut mapped.issues);
    let rejected: Vec<bool> = mapped.issues.iter().map(|i| !i.is_empty()).collect();
    let kept = dedupe_batch(&mapped.rows, &rejected);
    let mut fingerprints = row_fingerprints(entity, &mapped.rows, &kept.winners);
    // A deletion is a change of the row: it takes part in the fingerprint.
    for (fp, &row) in fingerprints.iter_mut().zip(&kept.winners) {
        if let Some(Some(at)) = mapped.deleted_at.get(row as usize) {
            let mut bytes = fp.to_le_bytes().to_vec();
            bytes.extend_from_slice(&at.to_le_bytes());
            *fp = xxhash_rust::xxh3::xxh3_128(&bytes);
        }
    }

    let position = |row: u64| SourcePosition {
        location: batch.location.clone(),
        sheet: batch.sheet.clone(),
        row,
    };
    let mut quarantine: Vec<QuarantineRecord> = Vec::new();
    for (row, errors) in mapped.issues.into_iter().enumerate() {
        if !errors.is_empty() {
            quarantine.push(QuarantineRecord {
                position: position(batch.positions[row]),
                raw: raw_values(&batch.records, row),
                errors,
            });
        }
    }
    for reject in batch.rejects {
        quarantine.push(QuarantineRecord {
            position: position(reject.position),
            raw: reject.raw,
            errors: vec![CellError::new("_record", reject.rule, None, reject.message)],
        });
    }
    quarantine.sort_by_key(|q| q.position.row);
    let tombstones = batch
        .deletions
        .into_iter()
        .map(|d| (d.external_id, d.deleted_at))
        .collect();

    LoadBatch {
        entity,
        rows: mapped.rows,
        load: kept.winners,
        fingerprints,
        quarantine,
        rows_read,
        deduplicated: kept.deduplicated,
        cursor: Some(batch.cursor),
        deleted_at: mapped.deleted_at,
        tombstones,
        settles: None,
    }
}

/// A source row as column -> value, exactly as read.
fn raw_values(records: &RecordBatch, row: usize) -> Map<String, Value> {
    let schema = records.schema();
    let mut raw = Map::new();
    for (field, column) in schema.fields().iter().zip(records.columns()) {
        let value = crate::map::cell_text(column.as_ref(), row).map_or(Value::Null, Value::String);
        raw.insert(field.name().clone(), value);
    }
    raw
}
