//! The commit path. A batch commit: compare-and-set the stream cursor (the fence), COPY
//! the rows into a temporary staging table, then one statement that classifies each staged
//! row against the stored one (insert / update / unchanged / same-run duplicate), upserts
//! the winners and marks the unchanged as read by this run; quarantined rows, the rollup
//! deltas and ledger counts join the same transaction.

use super::copy::{copy_in, copy_rows};
use super::migrate::latest_tenant_version;
use super::rollups::RollupDelta;
use super::{PostgresWarehouse, control_error, db, is_unique_violation, missing_tenant, table};
use crate::entity::Entity;
use crate::error::{EngineError, ErrorKind, Result};
use crate::ledger::{RowCounts, RunLedger, RunStatus};
use crate::tenant::TenantSlug;
use crate::validate::strings;
use crate::warehouse::sql::quote_ident;
use crate::warehouse::{BatchCommitted, LoadBatch, LoadStore, RunHistory, RunScope, StreamState};
use chrono::Utc;
use serde_json::Value;
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Classify staged rows against stored ones, upsert the winners, mark the unchanged as read
/// by this run, and count each fate. `$1` is the run id. The order of versions is the one
/// the SQLite warehouse applies: a missing `updated_at` sorts first; equal versions with
/// different content count as an update; rows already read by this same run are
/// duplicates, and the later one wins unless it is older.
pub(super) fn classify_upsert_sql(tenant: &TenantSlug, entity: Entity) -> String {
    let target = table(tenant, entity.name());
    let stage = quote_ident(&format!("sluice_stage_{}", entity.name()));
    let cols: Vec<String> = entity
        .table_columns()
        .iter()
        .map(|c| quote_ident(c))
        .collect();
    let updates: Vec<String> = entity
        .table_columns()
        .iter()
        .filter(|c| !matches!(**c, "source" | "external_id"))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
        .collect();
    let cmp = "CASE WHEN s.updated_at IS NOT DISTINCT FROM t.updated_at THEN 0 \
                    WHEN s.updated_at IS NULL THEN -1 WHEN t.updated_at IS NULL THEN 1 \
                    WHEN s.updated_at > t.updated_at THEN 1 ELSE -1 END";
    format!(
        "WITH staged AS ( \
           SELECT s.*, CASE \
             WHEN t.external_id IS NULL THEN 'insert' \
             WHEN t.run_id = $1 THEN CASE WHEN ({cmp}) >= 0 THEN 'dup_write' ELSE 'dup_skip' END \
             WHEN ({cmp}) < 0 THEN 'unchanged' \
             WHEN ({cmp}) = 0 AND s.row_hash = t.row_hash THEN 'unchanged' \
             ELSE 'update' END AS fate \
           FROM pg_temp.{stage} s LEFT JOIN {target} t ON t.source = s.source AND t.external_id = s.external_id \
         ), written AS ( \
           INSERT INTO {target} ({cols}) SELECT {cols} FROM staged WHERE fate IN ('insert', 'update', 'dup_write') \
           ON CONFLICT (source, external_id) DO UPDATE SET {updates} RETURNING 1 \
         ), touched AS ( \
           UPDATE {target} t SET run_id = $1 FROM staged s \
           WHERE s.fate = 'unchanged' AND t.source = s.source AND t.external_id = s.external_id RETURNING 1 \
         ) SELECT fate, count(*) AS n FROM staged GROUP BY fate",
        cols = cols.join(", "),
        updates = updates.join(", ")
    )
}

/// Keeps the last of several identical bad records in one batch: one quarantine entry each.
pub(super) fn distinct_quarantine(
    batch: &LoadBatch,
) -> Vec<(String, String, &crate::quarantine::QuarantineRecord)> {
    let mut by_hash: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(String, String, &crate::quarantine::QuarantineRecord)> = Vec::new();
    for record in &batch.quarantine {
        let raw = Value::Object(record.raw.clone()).to_string();
        let hash = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(raw.as_bytes()));
        match by_hash.get(&hash) {
            Some(&i) => out[i] = (raw, hash, record),
            None => {
                by_hash.insert(hash.clone(), out.len());
                out.push((raw, hash, record));
            }
        }
    }
    out
}

impl LoadStore for PostgresWarehouse {
    async fn prepare_tenant(&self, tenant: &TenantSlug) -> Result<()> {
        let version: Option<i32> =
            sqlx::query_scalar("SELECT schema_version FROM sluice.tenants WHERE slug = $1")
                .bind(tenant.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| control_error("reading the tenant", e))?;
        match version {
            None => Err(missing_tenant(tenant)),
            Some(v) if v < latest_tenant_version() => Err(EngineError::new(
                ErrorKind::Config,
                format!(
                    "tenant '{tenant}' is at schema version {v}, this build needs {}: run `sluice migrate`",
                    latest_tenant_version()
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    async fn stream_state(
        &self,
        tenant: &TenantSlug,
        pipeline: &str,
        stream: &str,
    ) -> Result<StreamState> {
        sqlx::query("INSERT INTO sluice.stream_state (tenant, pipeline, stream) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(tenant.as_str())
            .bind(pipeline)
            .bind(stream)
            .execute(&self.pool)
            .await
            .map_err(db("creating stream state"))?;
        let row = sqlx::query("SELECT cursor, version FROM sluice.stream_state WHERE tenant = $1 AND pipeline = $2 AND stream = $3")
            .bind(tenant.as_str())
            .bind(pipeline)
            .bind(stream)
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading stream state"))?;
        let cursor: Option<sqlx::types::Json<Value>> =
            row.try_get("cursor").map_err(db("cursor"))?;
        Ok(StreamState {
            cursor: cursor.map(|c| c.0),
            version: row.try_get("version").map_err(db("version"))?,
        })
    }

    async fn begin_run(&self, ledger: &RunLedger) -> Result<()> {
        let tenant = TenantSlug::parse(&ledger.tenant)?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the run record"))?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (run_id, pipeline, entity, \"trigger\", started_at, status, rules_hash) VALUES ($1, $2, $3, $4, $5, 'running', $6)",
            table(&tenant, "runs")
        )))
        .bind(&ledger.run_id)
        .bind(&ledger.pipeline)
        .bind(&ledger.entity)
        .bind(ledger.trigger.as_str())
        .bind(ledger.started_at)
        .bind(&ledger.rules_hash)
        .execute(&mut *tx)
        .await
        .map_err(db("recording the run start"))?;
        sqlx::query("INSERT INTO sluice.runs (run_id, tenant, pipeline, started_at) VALUES ($1, $2, $3, $4)")
            .bind(&ledger.run_id)
            .bind(tenant.as_str())
            .bind(&ledger.pipeline)
            .bind(ledger.started_at)
            .execute(&mut *tx)
            .await
            .map_err(db("indexing the run"))?;
        tx.commit().await.map_err(db("committing the run start"))
    }

    async fn commit_batch(
        &self,
        scope: &RunScope,
        batch: &LoadBatch,
        expected_version: i64,
    ) -> Result<BatchCommitted> {
        let commit = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        let tenant = &scope.tenant;
        let entity = batch.entity;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the batch transaction"))?;
        let version = fence(&mut tx, scope, batch.cursor.as_ref(), expected_version).await?;

        let mut counts = RowCounts {
            rows_read: batch.rows_read,
            quarantined: batch.quarantine.len() as u64,
            deduplicated: batch.deduplicated,
            ..RowCounts::default()
        };
        if !batch.load.is_empty() {
            let target = table(tenant, entity.name());
            let ids = strings(&batch.rows, "external_id");
            let keys: Vec<&str> = batch.load.iter().map(|&r| ids.value(r as usize)).collect();
            let loaded_at = Utc::now().timestamp_micros();
            let cols: Vec<String> = entity
                .table_columns()
                .iter()
                .map(|c| quote_ident(c))
                .collect();
            let copy_target = format!(
                "COPY {target} ({}) FROM STDIN (FORMAT binary)",
                cols.join(", ")
            );
            let all: Vec<(u32, u128)> = batch
                .load
                .iter()
                .copied()
                .zip(batch.fingerprints.iter().copied())
                .collect();

            // A batch of only new keys (the whole of a first load) is copied straight into
            // the table. Optimistically, when its first key is new: a key that turns out to
            // exist aborts the COPY with a unique violation, rolled back to a savepoint, and
            // the batch takes the classifying path below. The fence serialises writers of
            // this pipeline, so no key appears between the check and the write.
            let first_is_new: bool = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT NOT EXISTS (SELECT 1 FROM {target} WHERE source = $1 AND external_id = $2)"
            )))
            .bind(&scope.pipeline)
            .bind(keys[0])
            .fetch_one(&mut *tx)
            .await
            .map_err(db(format!("looking up existing {entity}")))?;
            let mut copied_all = false;
            if first_is_new {
                sqlx::raw_sql("SAVEPOINT sluice_fresh")
                    .execute(&mut *tx)
                    .await
                    .map_err(db("savepoint"))?;
                let data = copy_rows(
                    entity,
                    &batch.rows,
                    &batch.deleted_at,
                    &all,
                    &scope.pipeline,
                    loaded_at,
                    &scope.run_id,
                );
                match copy_in(&mut tx, &copy_target, data).await {
                    Ok(()) => copied_all = true,
                    Err(e) if is_unique_violation(&e) => {
                        sqlx::raw_sql("ROLLBACK TO SAVEPOINT sluice_fresh")
                            .execute(&mut *tx)
                            .await
                            .map_err(db("rolling back to the savepoint"))?;
                    }
                    Err(e) => {
                        return Err(EngineError::from_sqlx(format!("copying new {entity}"), e));
                    }
                }
            }
            let (known, fresh) = if copied_all {
                counts.inserted += all.len() as u64;
                (Vec::new(), Vec::new())
            } else {
                // Keys the warehouse already holds go through staging and classification;
                // the others are copied straight in.
                let existing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT external_id FROM {target} WHERE source = $1 AND external_id = ANY($2::text[])"
                )))
                .bind(&scope.pipeline)
                .bind(&keys)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(format!("looking up existing {entity}")))?;
                let existing: std::collections::HashSet<&str> =
                    existing.iter().map(String::as_str).collect();
                all.iter()
                    .zip(&keys)
                    .partition::<Vec<_>, _>(|(_, key)| existing.contains(**key))
            };
            let known: Vec<(u32, u128)> = known.into_iter().map(|(pair, _)| *pair).collect();
            let fresh: Vec<(u32, u128)> = fresh.into_iter().map(|(pair, _)| *pair).collect();
            // The inserted rows' part of the finance rollups (the triggers keep updates and
            // deletions; rows inserted are summed here, from the batch).
            let inserted = if copied_all { &all } else { &fresh };
            let delta = RollupDelta::of_inserts(entity, &batch.rows, &batch.deleted_at, inserted);

            if !fresh.is_empty() {
                let data = copy_rows(
                    entity,
                    &batch.rows,
                    &batch.deleted_at,
                    &fresh,
                    &scope.pipeline,
                    loaded_at,
                    &scope.run_id,
                );
                copy_in(&mut tx, &copy_target, data)
                    .await
                    .map_err(db(format!("copying new {entity}")))?;
                counts.inserted += fresh.len() as u64;
            }
            if let Some(delta) = delta {
                delta.apply(&mut tx, tenant).await?;
            }
            if !known.is_empty() {
                let stage = quote_ident(&format!("sluice_stage_{}", entity.name()));
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {target} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )))
                .execute(&mut *tx)
                .await
                .map_err(db("creating the staging table"))?;
                let data = copy_rows(
                    entity,
                    &batch.rows,
                    &batch.deleted_at,
                    &known,
                    &scope.pipeline,
                    loaded_at,
                    &scope.run_id,
                );
                let mut copy = tx
                    .copy_in_raw(&format!(
                        "COPY pg_temp.{stage} ({}) FROM STDIN (FORMAT binary)",
                        cols.join(", ")
                    ))
                    .await
                    .map_err(db("starting COPY"))?;
                copy.send(data).await.map_err(db("sending rows"))?;
                copy.finish().await.map_err(db("finishing COPY"))?;
            }
            self.fire("after_copy", &mut tx, commit).await?;
            if !known.is_empty() {
                let fates = sqlx::query(AssertSqlSafe(classify_upsert_sql(tenant, entity)))
                    .bind(&scope.run_id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db(format!("upserting {entity}")))?;
                for r in fates {
                    let fate: String = r.try_get("fate").map_err(db("fate"))?;
                    let n = r.try_get::<i64, _>("n").map_err(db("count"))? as u64;
                    match fate.as_str() {
                        "insert" => counts.inserted += n,
                        "update" => counts.updated += n,
                        "unchanged" => counts.unchanged += n,
                        _ => counts.deduplicated += n,
                    }
                }
            }
        }

        if !batch.tombstones.is_empty() {
            let (ids, at): (Vec<&str>, Vec<i64>) = batch
                .tombstones
                .iter()
                .map(|(id, at)| (id.as_str(), *at))
                .unzip();
            let marked = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {target} t SET deleted_at = to_timestamp(d.at / 1000000.0), run_id = $2, loaded_at = now() \
                 FROM UNNEST($3::text[], $4::int8[]) AS d(id, at) \
                 WHERE t.source = $1 AND t.external_id = d.id AND t.deleted_at IS NULL",
                target = table(tenant, entity.name())
            )))
            .bind(&scope.pipeline)
            .bind(&scope.run_id)
            .bind(&ids)
            .bind(&at)
            .execute(&mut *tx)
            .await
            .map_err(db(format!("marking deleted {entity}")))?
            .rows_affected();
            counts.updated += marked;
            counts.unchanged += ids.len() as u64 - marked;
        }

        let quarantine = distinct_quarantine(batch);
        if !quarantine.is_empty() {
            let ids: Vec<String> = quarantine
                .iter()
                .map(|_| uuid::Uuid::now_v7().to_string())
                .collect();
            let locations: Vec<&str> = quarantine
                .iter()
                .map(|(_, _, q)| q.position.location.as_str())
                .collect();
            let sheets: Vec<Option<&str>> = quarantine
                .iter()
                .map(|(_, _, q)| q.position.sheet.as_deref())
                .collect();
            let rows: Vec<i64> = quarantine
                .iter()
                .map(|(_, _, q)| q.position.row as i64)
                .collect();
            let raws: Vec<&str> = quarantine.iter().map(|(r, _, _)| r.as_str()).collect();
            let hashes: Vec<&str> = quarantine.iter().map(|(_, h, _)| h.as_str()).collect();
            let errors: Vec<String> = quarantine
                .iter()
                .map(|(_, _, q)| serde_json::to_string(&q.errors).unwrap_or_else(|_| "[]".into()))
                .collect();
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (id, run_id, pipeline, entity, status, location, sheet, source_row, raw, raw_text, raw_hash, errors, rules, created_at) \
                 SELECT q.id, $2, $3, $4, 'pending', q.loc, q.sheet, q.row, q.raw::jsonb, q.raw, q.hash, q.errors::jsonb, $5, now() \
                 FROM UNNEST($1::text[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], $11::text[]) \
                   AS q(id, loc, sheet, row, raw, hash, errors) \
                 ON CONFLICT (pipeline, raw_hash) WHERE status IN ('pending', 'fixed') DO UPDATE SET \
                   run_id = EXCLUDED.run_id, location = EXCLUDED.location, sheet = EXCLUDED.sheet, \
                   source_row = EXCLUDED.source_row, errors = EXCLUDED.errors, rules = EXCLUDED.rules",
                table(tenant, "quarantine")
            )))
            .bind(ids)
            .bind(&scope.run_id)
            .bind(&scope.pipeline)
            .bind(entity.name())
            .bind(&scope.rules_hash)
            .bind(locations)
            .bind(sheets)
            .bind(rows)
            .bind(raws)
            .bind(hashes)
            .bind(errors)
            .execute(&mut *tx)
            .await
            .map_err(db("writing quarantine"))?;
        }

        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET rows_read = rows_read + $1, inserted = inserted + $2, updated = updated + $3, \
             unchanged = unchanged + $4, quarantined = quarantined + $5, deduplicated = deduplicated + $6 WHERE run_id = $7",
            table(tenant, "runs")
        )))
        .bind(counts.rows_read as i64)
        .bind(counts.inserted as i64)
        .bind(counts.updated as i64)
        .bind(counts.unchanged as i64)
        .bind(counts.quarantined as i64)
        .bind(counts.deduplicated as i64)
        .bind(&scope.run_id)
        .execute(&mut *tx)
        .await
        .map_err(db("updating the run ledger"))?;
        if let Some(settles) = &batch.settles {
            super::quarantine::settle_in(
                &mut tx,
                tenant,
                &scope.run_id,
                &settles.replayed,
                &settles.failed,
            )
            .await?;
        }
        self.fire("before_commit", &mut tx, commit).await?;
        tx.commit().await.map_err(db("committing the batch"))?;
        Ok(BatchCommitted { counts, version })
    }

    async fn set_cursor(
        &self,
        scope: &RunScope,
        cursor: Option<&Value>,
        expected_version: i64,
    ) -> Result<i64> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the cursor transaction"))?;
        let version = fence(&mut tx, scope, cursor, expected_version).await?;
        tx.commit().await.map_err(db("committing the cursor"))?;
        Ok(version)
    }

    async fn finish_run(
        &self,
        tenant: &TenantSlug,
        run_id: &str,
        status: RunStatus,
        error: Option<&str>,
    ) -> Result<RunLedger> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET status = $1, finished_at = now(), error = $2 WHERE run_id = $3",
            table(tenant, "runs")
        )))
        .bind(status.as_str())
        .bind(error)
        .bind(run_id)
        .execute(&self.pool)
        .await
        .map_err(db("recording the run end"))?;
        self.run(tenant, run_id)
            .await?
            .ok_or_else(|| EngineError::new(ErrorKind::NotFound, format!("run {run_id} vanished")))
    }
}

pub(super) async fn fence(
    tx: &mut Transaction<'static, Postgres>,
    scope: &RunScope,
    cursor: Option<&Value>,
    expected_version: i64,
) -> Result<i64> {
    // Taking the row lock first makes a racing run wait here, then see the new version.
    let res = sqlx::query(
        "UPDATE sluice.stream_state SET cursor = $1, version = version + 1, updated_at = now() \
         WHERE tenant = $2 AND pipeline = $3 AND stream = $4 AND version = $5",
    )
    .bind(cursor.map(sqlx::types::Json))
    .bind(scope.tenant.as_str())
    .bind(&scope.pipeline)
    .bind(&scope.stream)
    .bind(expected_version)
    .execute(&mut **tx)
    .await
    .map_err(db("advancing the stream cursor"))?;
    if res.rows_affected() != 1 {
        return Err(scope.fenced(expected_version));
    }
    Ok(expected_version + 1)
}
