//! The commit path: fence on the stream's version, classify each row against the stored
//! one (insert / update / unchanged / same-run duplicate), write the winners with
//! multi-row upserts, and add quarantined rows and ledger counts in the same transaction.

use super::rows::get;
use super::{SqliteWarehouse, now_text};
use crate::columns::{CanonicalColumn, canonical_columns};
use crate::entity::{Entity, FieldKind};
use crate::error::{EngineError, ErrorKind, Result};
use crate::ledger::{RowCounts, RunLedger, RunStatus};
use crate::tenant::TenantSlug;
use crate::time::{format_date, format_timestamp};
use crate::validate::{strings, timestamps};
use crate::warehouse::sql::quote_ident;
use crate::warehouse::{BatchCommitted, LoadBatch, LoadStore, RunHistory, RunScope, StreamState};
use arrow_array::Array;
use serde_json::Value;
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use std::collections::HashMap;
use std::sync::Arc;

/// Rows per multi-row INSERT: 500 rows x at most 16 columns stays far below SQLite's
/// 32766 bound parameters.
pub(super) const ROWS_PER_STATEMENT: usize = 500;

impl SqliteWarehouse {
    fn upsert_statement(&self, entity: Entity, rows: usize) -> Arc<str> {
        let mut cache = self.upsert_sql.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry((entity, rows))
            .or_insert_with(|| upsert_sql(entity, rows).into())
            .clone()
    }
}

/// A multi-row upsert of `rows` rows, each binding [`Entity::table_columns`] in order.
pub(super) fn upsert_sql(entity: Entity, rows: usize) -> String {
    let cols = entity.table_columns();
    let placeholders = format!("(?, {}, ?, ?, ?, ?)", vec!["?"; cols.len() - 5].join(", "));
    let values = vec![placeholders.as_str(); rows].join(", ");
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| !matches!(**c, "source" | "external_id"))
        .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
        .collect();
    format!(
        "INSERT INTO {} ({}) VALUES {} ON CONFLICT (source, external_id) DO UPDATE SET {}",
        quote_ident(entity.name()),
        cols.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        values,
        updates.join(", ")
    )
}

/// The warehouse's copy of a row, as far as deciding the fate of an incoming one needs.
pub(super) struct StoredVersion {
    updated_at: Option<String>,
    row_hash: Vec<u8>,
    run_id: String,
}

/// What happens to one incoming row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    Insert,
    Update,
    Unchanged,
    /// Another row of this run with the same key was committed by an earlier batch.
    SameRunDuplicate {
        replaces: bool,
    },
}

pub(super) fn decide(
    incoming_version: &Option<String>,
    hash: &[u8],
    stored: Option<&StoredVersion>,
    run_id: &str,
) -> Fate {
    let Some(stored) = stored else {
        return Fate::Insert;
    };
    // Fixed-width RFC 3339 text orders like the instants it names; None sorts first.
    if stored.run_id == run_id {
        return Fate::SameRunDuplicate {
            replaces: *incoming_version >= stored.updated_at,
        };
    }
    if *incoming_version < stored.updated_at
        || (*incoming_version == stored.updated_at && stored.row_hash == hash)
    {
        Fate::Unchanged
    } else {
        Fate::Update
    }
}

pub(super) async fn check_fence(
    tx: &mut Transaction<'static, Sqlite>,
    scope: &RunScope,
    cursor: Option<&Value>,
    expected_version: i64,
) -> Result<i64> {
    let cursor_text = cursor.map(Value::to_string);
    let res = sqlx::query(
        "UPDATE stream_state SET cursor = ?, version = version + 1, updated_at = ? \
         WHERE pipeline = ? AND stream = ? AND version = ?",
    )
    .bind(cursor_text)
    .bind(now_text())
    .bind(&scope.pipeline)
    .bind(&scope.stream)
    .bind(expected_version)
    .execute(&mut **tx)
    .await
    .map_err(|e| EngineError::from_sqlx("advancing the stream cursor", e))?;
    if res.rows_affected() != 1 {
        return Err(scope.fenced(expected_version));
    }
    Ok(expected_version + 1)
}

impl LoadStore for SqliteWarehouse {
    async fn prepare_tenant(&self, tenant: &TenantSlug) -> Result<()> {
        self.pool(tenant, true).await.map(|_| ())
    }

    async fn stream_state(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        stream: &str,
    ) -> Result<StreamState> {
        let pool = self.pool(tenant, true).await?;
        sqlx::query(
            "INSERT INTO stream_state (pipeline, stream, cursor, version, updated_at) VALUES (?, ?, NULL, 0, ?) \
             ON CONFLICT (pipeline, stream) DO NOTHING",
        )
        .bind(pipeline)
        .bind(stream)
        .bind(now_text())
        .execute(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("creating stream state", e))?;
        let row = sqlx::query(
            "SELECT cursor, version FROM stream_state WHERE pipeline = ? AND stream = ?",
        )
        .bind(pipeline)
        .bind(stream)
        .fetch_one(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("reading stream state", e))?;
        let cursor: Option<String> = row
            .try_get("cursor")
            .map_err(|e| EngineError::from_sqlx("cursor", e))?;
        let cursor = match cursor {
            Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                EngineError::new(ErrorKind::Warehouse, "stored cursor is not JSON").with_source(e)
            })?),
            None => None,
        };
        let version: i64 = row
            .try_get("version")
            .map_err(|e| EngineError::from_sqlx("version", e))?;
        Ok(StreamState { cursor, version })
    }

    async fn begin_run(&self, ledger: &RunLedger) -> Result<()> {
        let tenant = TenantSlug::parse(&ledger.tenant)?;
        let pool = self.pool(&tenant, true).await?;
        sqlx::query(
            "INSERT INTO runs (run_id, pipeline, entity, \"trigger\", started_at, status, rules_hash) \
             VALUES (?, ?, ?, ?, ?, 'running', ?)",
        )
        .bind(&ledger.run_id)
        .bind(&ledger.pipeline)
        .bind(&ledger.entity)
        .bind(ledger.trigger.as_str())
        .bind(ledger.started_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .bind(&ledger.rules_hash)
        .execute(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("recording the run start", e))?;
        Ok(())
    }

    async fn commit_batch(
        &self,
        scope: &RunScope,
        batch: &LoadBatch,
        expected_version: i64,
    ) -> Result<BatchCommitted> {
        let pool = self.pool(&scope.tenant, true).await?;
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| EngineError::from_sqlx("starting the batch transaction", e))?;
        let version = check_fence(&mut tx, scope, batch.cursor.as_ref(), expected_version).await?;

        let entity = batch.entity;
        let ids = strings(&batch.rows, "external_id");
        let updated = timestamps(&batch.rows, "updated_at");
        let keys: Vec<&str> = batch.load.iter().map(|&r| ids.value(r as usize)).collect();
        let stored = fetch_versions(&mut tx, entity, &scope.pipeline, &keys).await?;

        let mut counts = RowCounts {
            rows_read: batch.rows_read,
            quarantined: batch.quarantine.len() as u64,
            deduplicated: batch.deduplicated,
            ..RowCounts::default()
        };
        let mut to_write: Vec<(u32, [u8; 16])> = Vec::with_capacity(batch.load.len());
        let mut seen_unchanged: Vec<&str> = Vec::new();
        for (i, &row) in batch.load.iter().enumerate() {
            let hash = batch.fingerprints[i].to_le_bytes();
            let version = updated
                .is_valid(row as usize)
                .then(|| format_timestamp(updated.value(row as usize)));
            match decide(&version, &hash, stored.get(keys[i]), &scope.run_id) {
                Fate::Insert => {
                    counts.inserted += 1;
                    to_write.push((row, hash));
                }
                Fate::Update => {
                    counts.updated += 1;
                    to_write.push((row, hash));
                }
                Fate::Unchanged => {
                    counts.unchanged += 1;
                    seen_unchanged.push(keys[i]);
                }
                Fate::SameRunDuplicate { replaces } => {
                    counts.deduplicated += 1;
                    if replaces {
                        to_write.push((row, hash));
                    }
                }
            }
        }

        let loaded_at = now_text();
        let columns = canonical_columns(entity, &batch.rows);
        for chunk in to_write.chunks(ROWS_PER_STATEMENT) {
            let sql = self.upsert_statement(entity, chunk.len());
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (row, hash) in chunk {
                q = q.bind(scope.pipeline.clone());
                q = bind_fields(q, &columns, *row as usize);
                q = q.bind(batch.deleted_at(*row as usize).map(format_timestamp));
                q = q
                    .bind(loaded_at.clone())
                    .bind(scope.run_id.clone())
                    .bind(hash.to_vec());
            }
            q.execute(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx(format!("writing {entity}"), e))?;
        }

        if !seen_unchanged.is_empty() {
            // Mark unchanged rows as read by this run, so a later batch of the same run that
            // repeats the key counts as a duplicate, exactly as it did on the first load.
            let sql = format!(
                "UPDATE {} SET run_id = ? WHERE source = ? AND external_id IN (SELECT value FROM json_each(?))",
                quote_ident(entity.name())
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(&scope.run_id)
                .bind(&scope.pipeline)
                .bind(serde_json::to_string(&seen_unchanged).unwrap_or_else(|_| "[]".into()))
                .execute(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx(format!("marking unchanged {entity}"), e))?;
        }

        let mark_deleted = format!(
            "UPDATE {} SET deleted_at = ?, run_id = ?, loaded_at = ? WHERE source = ? AND external_id = ? AND deleted_at IS NULL",
            quote_ident(entity.name())
        );
        for (id, at) in &batch.tombstones {
            let marked = sqlx::query(AssertSqlSafe(mark_deleted.clone()))
                .bind(format_timestamp(*at))
                .bind(&scope.run_id)
                .bind(&loaded_at)
                .bind(&scope.pipeline)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx(format!("marking deleted {entity}"), e))?
                .rows_affected();
            if marked > 0 {
                counts.updated += 1;
            } else {
                counts.unchanged += 1;
            }
        }

        for record in &batch.quarantine {
            let raw = Value::Object(record.raw.clone()).to_string();
            let raw_hash = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(raw.as_bytes()));
            sqlx::query(
                "INSERT INTO quarantine (id, run_id, pipeline, entity, status, location, sheet, source_row, raw, raw_hash, errors, rules, created_at) \
                 VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (pipeline, raw_hash) WHERE status IN ('pending', 'fixed') DO UPDATE SET \
                 run_id = excluded.run_id, location = excluded.location, sheet = excluded.sheet, \
                 source_row = excluded.source_row, errors = excluded.errors, rules = excluded.rules",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&scope.run_id)
            .bind(&scope.pipeline)
            .bind(entity.name())
            .bind(&record.position.location)
            .bind(&record.position.sheet)
            .bind(record.position.row as i64)
            .bind(raw)
            .bind(raw_hash)
            .bind(serde_json::to_string(&record.errors).unwrap_or_else(|_| "[]".into()))
            .bind(&scope.rules_hash)
            .bind(&loaded_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| EngineError::from_sqlx("writing quarantine", e))?;
        }

        add_to_ledger(&mut tx, &scope.run_id, &counts).await?;
        if let Some(settles) = &batch.settles {
            super::quarantine::settle_in(
                &mut tx,
                &scope.run_id,
                &settles.replayed,
                &settles.failed,
            )
            .await?;
        }
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the batch", e))?;
        Ok(BatchCommitted { counts, version })
    }

    async fn set_cursor(
        &self,
        scope: &RunScope,
        cursor: Option<&Value>,
        expected_version: i64,
    ) -> Result<i64> {
        let pool = self.pool(&scope.tenant, true).await?;
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| EngineError::from_sqlx("starting the cursor transaction", e))?;
        let version = check_fence(&mut tx, scope, cursor, expected_version).await?;
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the cursor", e))?;
        Ok(version)
    }

    async fn finish_run(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
        status: RunStatus,
        error: Option<&str>,
    ) -> Result<RunLedger> {
        let pool = self.pool(tenant, false).await?;
        sqlx::query("UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE run_id = ?")
            .bind(status.as_str())
            .bind(now_text())
            .bind(error)
            .bind(run_id)
            .execute(&pool)
            .await
            .map_err(|e| EngineError::from_sqlx("recording the run end", e))?;
        self.run(tenant, run_id).await?.ok_or_else(|| {
            EngineError::new(
                ErrorKind::NotFound,
                format!("run {run_id} vanished from the ledger"),
            )
        })
    }
}

pub(super) async fn fetch_versions(
    tx: &mut Transaction<'static, Sqlite>,
    entity: Entity,
    source: &str,
    keys: &[&str],
) -> Result<HashMap<String, StoredVersion>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT external_id, updated_at, row_hash, run_id FROM {} \
         WHERE source = ? AND external_id IN (SELECT value FROM json_each(?))",
        quote_ident(entity.name())
    );
    let keys_json = serde_json::to_string(keys).unwrap_or_else(|_| "[]".into());
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(source)
        .bind(keys_json)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| EngineError::from_sqlx(format!("reading existing {entity}"), e))?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        out.insert(
            get::<String>(&r, "external_id")?,
            StoredVersion {
                updated_at: get(&r, "updated_at")?,
                row_hash: get(&r, "row_hash")?,
                run_id: get(&r, "run_id")?,
            },
        );
    }
    Ok(out)
}

pub(super) async fn add_to_ledger(
    tx: &mut Transaction<'static, Sqlite>,
    run_id: &str,
    c: &RowCounts,
) -> Result<()> {
    sqlx::query(
        "UPDATE runs SET rows_read = rows_read + ?, inserted = inserted + ?, updated = updated + ?, \
         unchanged = unchanged + ?, quarantined = quarantined + ?, deduplicated = deduplicated + ? WHERE run_id = ?",
    )
    .bind(c.rows_read as i64)
    .bind(c.inserted as i64)
    .bind(c.updated as i64)
    .bind(c.unchanged as i64)
    .bind(c.quarantined as i64)
    .bind(c.deduplicated as i64)
    .bind(run_id)
    .execute(&mut **tx)
    .await
    .map_err(|e| EngineError::from_sqlx("updating the run ledger", e))?;
    Ok(())
}

pub(super) type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds one row's canonical values, in field order.
pub(super) fn bind_fields<'q>(
    mut q: SqliteQuery<'q>,
    columns: &[(FieldKind, CanonicalColumn<'_>)],
    row: usize,
) -> SqliteQuery<'q> {
    for (_, column) in columns {
        let valid = column.is_valid(row);
        q = match column {
            CanonicalColumn::Text(a) => q.bind(valid.then(|| a.value(row).to_string())),
            CanonicalColumn::Date(a) => q.bind(valid.then(|| format_date(a.value(row)))),
            CanonicalColumn::Instant(a) => q.bind(valid.then(|| format_timestamp(a.value(row)))),
            // Amounts are bounded to 18 digits by the map stage, so they fit an i64.
            CanonicalColumn::Money(a) => q.bind(valid.then(|| a.value(row) as i64)),
            CanonicalColumn::Flag(a) => q.bind(valid.then(|| a.value(row))),
        };
    }
    q
}
