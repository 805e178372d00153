//! An in-memory [`LoadStore`] for tests (feature `test-utils`): it keeps the load contract
//! (atomic, fenced, idempotent; an older `updated_at` never overwrites a newer one) with
//! no database, and faults can be injected so that scenario tests read like stories:
//! "the store fails on the 4th batch commit; the next run resumes after the 3rd".
//!
//! It must never be used outside tests: nothing is persisted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use arrow_array::Array;
use chrono::Utc;
use rust_decimal::Decimal;
use serde_json::Value;

use super::{BatchCommitted, LoadBatch, LoadStore, RunHistory, RunScope, StreamState};
use crate::columns::{CanonicalColumn, canonical_columns};
use crate::entity::{Entity, FieldKind};
use crate::error::{EngineError, ErrorKind, Result};
use crate::ledger::{RowCounts, RunLedger, RunStatus};
use crate::money::display_decimal;
use crate::quarantine::QuarantineRecord;
use crate::tenant::TenantSlug;
use crate::time::{format_date, format_timestamp};
use crate::validate::{strings, timestamps};

/// A loaded row as the memory store keeps it: every canonical field as display text.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRow {
    /// The pipeline that loaded it.
    pub source: String,
    /// The source's id.
    pub external_id: String,
    /// Field name -> value as text (dates `YYYY-MM-DD`, amounts as decimals).
    pub fields: BTreeMap<&'static str, Option<String>>,
    /// When the source deleted it (UTC microseconds).
    pub deleted_at: Option<i64>,
    /// The run that last wrote or read it.
    pub run_id: String,
    updated_at: Option<i64>,
    fingerprint: u128,
}

impl MemoryRow {
    /// A money field as a decimal.
    pub fn amount(&self, field: &str) -> Option<Decimal> {
        self.fields.get(field)?.as_deref()?.parse().ok()
    }

    /// A text field.
    pub fn text(&self, field: &str) -> Option<&str> {
        self.fields.get(field)?.as_deref()
    }
}

/// Faults a test asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFaults {
    /// The batch commit (1-based, counted over the store's life) that fails as an
    /// unavailable warehouse would, before it changes anything.
    pub fail_commit: Option<u64>,
}

#[derive(Default)]
struct Contents {
    tenants: Vec<TenantSlug>,
    streams: HashMap<(String, String, String), StreamState>,
    runs: BTreeMap<(String, String), RunLedger>,
    rows: BTreeMap<(String, Entity, String, String), MemoryRow>,
    /// Open quarantined rows by (tenant, pipeline, raw values): a row read again updates
    /// its entry, as the warehouses' unique index on open rows does.
    quarantine: BTreeMap<(String, String, String), (String, QuarantineRecord)>,
    commits: u64,
}

/// The in-memory store.
#[derive(Default)]
pub struct MemoryWarehouse {
    contents: Mutex<Contents>,
    faults: MemoryFaults,
}

impl MemoryWarehouse {
    /// An empty store that injects `faults`.
    pub fn with_faults(faults: MemoryFaults) -> Self {
        MemoryWarehouse {
            contents: Mutex::default(),
            faults,
        }
    }

    fn contents(&self) -> std::sync::MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tenant's loaded rows of `entity` that the source has not deleted, in key order.
    pub fn live_rows(&self, tenant: &TenantSlug, entity: Entity) -> Vec<MemoryRow> {
        self.contents()
            .rows
            .iter()
            .filter(|((t, e, _, _), row)| {
                t == tenant.as_str() && *e == entity && row.deleted_at.is_none()
            })
            .map(|(_, row)| row.clone())
            .collect()
    }

    /// The tenant's open quarantined rows with the run that last set each aside.
    pub fn quarantined(&self, tenant: &TenantSlug) -> Vec<(String, QuarantineRecord)> {
        self.contents()
            .quarantine
            .iter()
            .filter(|((t, _, _), _)| t == tenant.as_str())
            .map(|(_, entry)| entry.clone())
            .collect()
    }
}

fn stream_key(tenant: &TenantSlug, pipeline: &str, stream: &str) -> (String, String, String) {
    (tenant.to_string(), pipeline.to_string(), stream.to_string())
}

/// Every canonical field of `row` as display text (`columns`: the batch's, resolved once).
fn field_texts(
    entity: Entity,
    columns: &[(FieldKind, CanonicalColumn<'_>)],
    row: usize,
) -> BTreeMap<&'static str, Option<String>> {
    entity
        .fields()
        .iter()
        .zip(columns)
        .map(|(field, (_, column))| {
            let text = column.is_valid(row).then(|| match column {
                CanonicalColumn::Text(a) => a.value(row).to_string(),
                CanonicalColumn::Date(a) => format_date(a.value(row)),
                CanonicalColumn::Instant(a) => format_timestamp(a.value(row)),
                CanonicalColumn::Money(a) => display_decimal(a.value(row)).to_string(),
                CanonicalColumn::Flag(a) => a.value(row).to_string(),
            });
            (field.name, text)
        })
        .collect()
}

impl LoadStore for MemoryWarehouse {
    async fn prepare_tenant(&self, tenant: &TenantSlug) -> Result<()> {
        let mut contents = self.contents();
        if !contents.tenants.contains(tenant) {
            contents.tenants.push(tenant.clone());
        }
        Ok(())
    }

    async fn stream_state(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        stream: &str,
    ) -> Result<StreamState> {
        Ok(self
            .contents()
            .streams
            .get(&stream_key(tenant, pipeline, stream))
            .cloned()
            .unwrap_or(StreamState {
                cursor: None,
                version: 0,
            }))
    }

    async fn begin_run(&self, ledger: &RunLedger) -> Result<()> {
        self.contents().runs.insert(
            (ledger.tenant.clone(), ledger.run_id.clone()),
            ledger.clone(),
        );
        Ok(())
    }

    async fn commit_batch(
        &self,
        scope: &RunScope,
        batch: &LoadBatch,
        expected_version: i64,
    ) -> Result<BatchCommitted> {
        let mut contents = self.contents();
        contents.commits += 1;
        if self.faults.fail_commit == Some(contents.commits) {
            return Err(EngineError::new(
                ErrorKind::WarehouseUnavailable,
                format!("injected failure on batch commit {}", contents.commits),
            ));
        }
        let key = stream_key(&scope.tenant, &scope.pipeline, &scope.stream);
        let current = contents.streams.get(&key).map_or(0, |s| s.version);
        if current != expected_version {
            return Err(scope.fenced(expected_version));
        }
        // Everything below is decided on a copy and swapped in at the end: atomic.
        let mut rows = contents.rows.clone();
        let mut counts = RowCounts {
            rows_read: batch.rows_read,
            quarantined: batch.quarantine.len() as u64,
            deduplicated: batch.deduplicated,
            ..RowCounts::default()
        };
        let ids = strings(&batch.rows, "external_id");
        let updated = timestamps(&batch.rows, "updated_at");
        let tenant = scope.tenant.to_string();
        let columns = canonical_columns(batch.entity, &batch.rows);
        for (i, &row) in batch.load.iter().enumerate() {
            let row = row as usize;
            let external_id = ids.value(row).to_string();
            let updated_at = updated.is_valid(row).then(|| updated.value(row));
            let fingerprint = batch.fingerprints[i];
            let row_key = (
                tenant.clone(),
                batch.entity,
                scope.pipeline.clone(),
                external_id.clone(),
            );
            let write = match rows.get_mut(&row_key) {
                None => {
                    counts.inserted += 1;
                    true
                }
                Some(stored) if stored.run_id == scope.run_id => {
                    counts.deduplicated += 1;
                    updated_at >= stored.updated_at
                }
                Some(stored)
                    if updated_at < stored.updated_at
                        || (updated_at == stored.updated_at
                            && stored.fingerprint == fingerprint) =>
                {
                    counts.unchanged += 1;
                    stored.run_id = scope.run_id.clone();
                    false
                }
                Some(_) => {
                    counts.updated += 1;
                    true
                }
            };
            if write {
                rows.insert(
                    row_key,
                    MemoryRow {
                        source: scope.pipeline.clone(),
                        external_id,
                        fields: field_texts(batch.entity, &columns, row),
                        deleted_at: batch.deleted_at(row),
                        run_id: scope.run_id.clone(),
                        updated_at,
                        fingerprint,
                    },
                );
            }
        }
        for (external_id, at) in &batch.tombstones {
            let row_key = (
                tenant.clone(),
                batch.entity,
                scope.pipeline.clone(),
                external_id.clone(),
            );
            match rows.get_mut(&row_key) {
                Some(stored) if stored.deleted_at.is_none() => {
                    stored.deleted_at = Some(*at);
                    stored.run_id = scope.run_id.clone();
                    counts.updated += 1;
                }
                _ => counts.unchanged += 1,
            }
        }
        let ledger = contents
            .runs
            .get_mut(&(tenant.clone(), scope.run_id.clone()))
            .ok_or_else(|| {
                EngineError::new(
                    ErrorKind::NotFound,
                    format!("run {} was never begun", scope.run_id),
                )
            })?;
        ledger.counts.add(&counts);
        contents.rows = rows;
        for record in &batch.quarantine {
            let raw = Value::Object(record.raw.clone()).to_string();
            contents.quarantine.insert(
                (tenant.clone(), scope.pipeline.clone(), raw),
                (scope.run_id.clone(), record.clone()),
            );
        }
        let version = expected_version + 1;
        contents.streams.insert(
            key,
            StreamState {
                cursor: batch.cursor.clone(),
                version,
            },
        );
        Ok(BatchCommitted { counts, version })
    }

    async fn set_cursor(
        &self,
        scope: &RunScope,
        cursor: Option<&Value>,
        expected_version: i64,
    ) -> Result<i64> {
        let mut contents = self.contents();
        let key = stream_key(&scope.tenant, &scope.pipeline, &scope.stream);
        let current = contents.streams.get(&key).map_or(0, |s| s.version);
        if current != expected_version {
            return Err(scope.fenced(expected_version));
        }
        let version = expected_version + 1;
        contents.streams.insert(
            key,
            StreamState {
                cursor: cursor.cloned(),
                version,
            },
        );
        Ok(version)
    }

    async fn finish_run(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
        status: RunStatus,
        error: Option<&str>,
    ) -> Result<RunLedger> {
        let mut contents = self.contents();
        let ledger = contents
            .runs
            .get_mut(&(tenant.to_string(), run_id.to_string()))
            .ok_or_else(|| {
                EngineError::new(ErrorKind::NotFound, format!("run {run_id} was never begun"))
            })?;
        ledger.status = status;
        ledger.error = error.map(str::to_string);
        ledger.finished_at = Some(Utc::now());
        Ok(ledger.clone())
    }
}

impl RunHistory for MemoryWarehouse {
    async fn tenants(&self) -> Result<Vec<TenantSlug>> {
        Ok(self.contents().tenants.clone())
    }

    async fn run(&self, tenant: &TenantSlug, run_id: &str) -> Result<Option<RunLedger>> {
        Ok(self
            .contents()
            .runs
            .get(&(tenant.to_string(), run_id.to_string()))
            .cloned())
    }

    async fn runs(
        &self,
        tenant: &TenantSlug,
        pipeline: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunLedger>> {
        let mut runs: Vec<RunLedger> = self
            .contents()
            .runs
            .values()
            .filter(|l| l.tenant == tenant.as_str() && pipeline.is_none_or(|p| l.pipeline == p))
            .cloned()
            .collect();
        runs.sort_by_key(|l| std::cmp::Reverse(l.started_at));
        runs.truncate(limit as usize);
        Ok(runs)
    }
}
