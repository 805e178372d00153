//! The embedded coordinator: locks, idempotency keys, job results and scheduler ticks in
//! the embedded queue's SQLite file, each operation one atomic statement.

use super::{Acquired, Behind, IDEMPOTENCY_TTL, Lease, Released, run_of, started};
use crate::error::{WorkerError, WorkerErrorKind};
use chrono::Utc;
use sqlx::SqlitePool;
use std::time::Duration;

/// The embedded coordinator: tables in the embedded queue's SQLite file.
#[derive(Clone)]
pub struct SqliteCoord {
    pool: SqlitePool,
}

const SETUP: &str = "
CREATE TABLE IF NOT EXISTS sluice_locks (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sluice_idempotency (key TEXT PRIMARY KEY, run_id TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sluice_job_results (run_id TEXT PRIMARY KEY, result TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sluice_ticks (pipeline TEXT PRIMARY KEY, tick INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sluice_next (key TEXT PRIMARY KEY, lease TEXT NOT NULL, job TEXT NOT NULL);
";

fn db_error(context: &str, e: sqlx::Error) -> WorkerError {
    WorkerError::new(WorkerErrorKind::Queue, context).with_source(e)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteCoord {
    pub(super) fn lock_key(tenant: &str, pipeline: &str) -> String {
        format!("lock:{tenant}:{pipeline}")
    }

    /// Creates the tables if needed.
    pub async fn new(pool: SqlitePool) -> Result<Self, WorkerError> {
        sqlx::raw_sql(SETUP)
            .execute(&pool)
            .await
            .map_err(|e| db_error("creating the coordination tables", e))?;
        // When a waiting run took the lock (files made before it was recorded: 0).
        let stamped: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pragma_table_info('sluice_next') WHERE name = 'at'",
        )
        .fetch_one(&pool)
        .await
        .map_err(|e| db_error("reading the coordination tables", e))?;
        if stamped == 0 {
            sqlx::query("ALTER TABLE sluice_next ADD COLUMN at INTEGER NOT NULL DEFAULT 0")
                .execute(&pool)
                .await
                .map_err(|e| db_error("updating the coordination tables", e))?;
        }
        Ok(SqliteCoord { pool })
    }

    pub(super) async fn acquire(
        &self,
        tenant: &str,
        pipeline: &str,
        run_id: &str,
        ttl: Duration,
    ) -> Result<Acquired, WorkerError> {
        let lease = Lease {
            key: Self::lock_key(tenant, pipeline),
            run_id: run_id.to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
        };
        self.acquire_queued(&lease, None, ttl, None).await
    }

    /// See [`super::Coordinator::acquire_queued`]: one transaction.
    pub(super) async fn acquire_queued(
        &self,
        lease: &Lease,
        job: Option<&str>,
        ttl: Duration,
        key: Option<(&str, &str)>,
    ) -> Result<Acquired, WorkerError> {
        let fail = |e| db_error("taking the pipeline lock", e);
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        let idem = key.map(|(tenant, key)| format!("{tenant}:{key}"));
        if let Some(k) = &idem
            && let Some(run) = key_seen(&mut tx, k, now).await.map_err(fail)?
        {
            return Ok(Acquired::Repeated(run));
        }
        let holder: Option<String> =
            sqlx::query_scalar("SELECT value FROM sluice_locks WHERE key = ? AND expires_at > ?")
                .bind(&lease.key)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?;
        if let Some(holder) = holder {
            return Ok(Acquired::Busy {
                run_id: run_of(&holder),
            });
        }
        let waiting: Option<(String, String)> =
            sqlx::query_as("SELECT lease, job FROM sluice_next WHERE key = ?")
                .bind(&lease.key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?;
        let value = waiting
            .as_ref()
            .map(|(w, _)| w.clone())
            .unwrap_or_else(|| lease.value());
        sqlx::query(
            "INSERT INTO sluice_locks (key, value, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(&lease.key)
        .bind(&value)
        .bind(now + ms(ttl))
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
        if waiting.is_some() {
            sqlx::query("UPDATE sluice_next SET at = ? WHERE key = ?")
                .bind(now)
                .bind(&lease.key)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        } else if let Some(job) = job {
            sqlx::query("INSERT INTO sluice_next (key, lease, job, at) VALUES (?, ?, ?, ?)")
                .bind(&lease.key)
                .bind(&value)
                .bind(job)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        }
        if let Some(k) = &idem {
            record_key(&mut tx, k, &run_of(&value), now)
                .await
                .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(match waiting {
            Some((w, job)) => Acquired::Waiting {
                run_id: run_of(&w),
                job,
            },
            None => Acquired::Held(lease.clone()),
        })
    }

    /// See [`super::Coordinator::pending`].
    pub(super) async fn pending(
        &self,
        lock_key: &str,
        grace: Duration,
    ) -> Result<Option<String>, WorkerError> {
        let now = now_ms();
        sqlx::query_scalar(
            "SELECT n.job FROM sluice_next n JOIN sluice_locks l ON l.key = n.key AND l.value = n.lease \
             WHERE n.key = ? AND l.expires_at > ? AND n.at <= ?",
        )
        .bind(lock_key)
        .bind(now)
        .bind(now - ms(grace))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("reading the run waiting for the lock", e))
    }

    pub(super) async fn claim(
        &self,
        lease: &Lease,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lease, String>, WorkerError> {
        let held = lease.held_by(holder);
        Ok(match self.take(&held, Some(lease), ttl).await? {
            None => {
                // A run that starts is no longer waiting.
                sqlx::query("DELETE FROM sluice_next WHERE key = ? AND lease = ?")
                    .bind(&lease.key)
                    .bind(lease.value())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| db_error("taking the pipeline lock", e))?;
                Ok(held)
            }
            Some(run) => Err(run),
        })
    }

    /// Sets the lock to `lease` when it is free (or expired), already holds `lease`, or
    /// holds `handed_over` (the queued lease a worker takes over); otherwise returns the
    /// holder's run.
    async fn take(
        &self,
        lease: &Lease,
        handed_over: Option<&Lease>,
        ttl: Duration,
    ) -> Result<Option<String>, WorkerError> {
        let now = now_ms();
        let queued = handed_over.map(Lease::value);
        let took: Option<String> = sqlx::query_scalar(
            "INSERT INTO sluice_locks (key, value, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at \
             WHERE sluice_locks.expires_at <= ?4 OR sluice_locks.value = excluded.value \
                OR sluice_locks.value = ?5 \
             RETURNING value",
        )
        .bind(&lease.key)
        .bind(lease.value())
        .bind(now + ms(ttl))
        .bind(now)
        .bind(queued)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("taking the pipeline lock", e))?;
        if took.is_some() {
            return Ok(None);
        }
        let holder: Option<String> =
            sqlx::query_scalar("SELECT value FROM sluice_locks WHERE key = ?")
                .bind(&lease.key)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| db_error("reading the pipeline lock", e))?;
        Ok(Some(
            holder
                .and_then(|v| v.split('|').next().map(str::to_string))
                .unwrap_or_default(),
        ))
    }

    pub(super) async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, WorkerError> {
        let now = now_ms();
        let n = sqlx::query(
            "UPDATE sluice_locks SET expires_at = ? WHERE key = ? AND value = ? AND expires_at > ?",
        )
        .bind(now + ms(ttl))
        .bind(&lease.key)
        .bind(lease.value())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("renewing the pipeline lock", e))?
        .rows_affected();
        Ok(n == 1)
    }

    /// A write transaction taken at its start, so that two processes' read-then-write
    /// steps never interleave.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, WorkerError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("starting a lock transaction", e))
    }

    pub(super) async fn release(
        &self,
        lease: &Lease,
        queued_ttl: Duration,
    ) -> Result<Released, WorkerError> {
        let fail = |e| db_error("releasing the pipeline lock", e);
        let mut tx = self.write_tx().await?;
        let n = sqlx::query("DELETE FROM sluice_locks WHERE key = ? AND value = ?")
            .bind(&lease.key)
            .bind(lease.value())
            .execute(&mut *tx)
            .await
            .map_err(fail)?
            .rows_affected();
        if n != 1 {
            return Ok(Released::NotOurs);
        }
        let next: Option<(String, String)> =
            sqlx::query_as("SELECT lease, job FROM sluice_next WHERE key = ?")
                .bind(&lease.key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?;
        let released = match next {
            // Our own run, pushed and now ended (its entry outlived a failed clean-up).
            Some((next, _)) if run_of(&next) == lease.run_id => {
                sqlx::query("DELETE FROM sluice_next WHERE key = ?")
                    .bind(&lease.key)
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
                Released::Free
            }
            Some((next, job)) => {
                sqlx::query("INSERT INTO sluice_locks (key, value, expires_at) VALUES (?, ?, ?)")
                    .bind(&lease.key)
                    .bind(next)
                    .bind(now_ms() + ms(queued_ttl))
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
                sqlx::query("UPDATE sluice_next SET at = ? WHERE key = ?")
                    .bind(now_ms())
                    .bind(&lease.key)
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
                Released::HandedOver(job)
            }
            None => Released::Free,
        };
        tx.commit().await.map_err(fail)?;
        Ok(released)
    }

    pub(super) async fn queue_behind(
        &self,
        lease: &Lease,
        job: &str,
        key: Option<(&str, &str)>,
    ) -> Result<Behind, WorkerError> {
        let fail = |e| db_error("queueing a run behind the running one", e);
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        let holder: Option<String> =
            sqlx::query_scalar("SELECT value FROM sluice_locks WHERE key = ? AND expires_at > ?")
                .bind(&lease.key)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?;
        let Some(holder) = holder else {
            return Ok(Behind::Free);
        };
        let target = if started(&holder) {
            sqlx::query_scalar::<_, String>("SELECT lease FROM sluice_next WHERE key = ?")
                .bind(&lease.key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?
                .map(|v| run_of(&v))
                .filter(|run| *run != run_of(&holder))
        } else {
            Some(run_of(&holder))
        };
        let idem = key.map(|(tenant, key)| format!("{tenant}:{key}"));
        if let Some(k) = &idem
            && let Some(run) = key_seen(&mut tx, k, now).await.map_err(fail)?
        {
            return Ok(Behind::Repeated(run));
        }
        let behind = match target {
            Some(run) => Behind::Joined(run),
            None => {
                sqlx::query(
                    "INSERT OR REPLACE INTO sluice_next (key, lease, job, at) VALUES (?, ?, ?, ?)",
                )
                .bind(&lease.key)
                .bind(lease.value())
                .bind(job)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
                Behind::Queued
            }
        };
        if let Some(k) = &idem {
            let run = match &behind {
                Behind::Joined(run) => run.clone(),
                _ => lease.run_id.clone(),
            };
            record_key(&mut tx, k, &run, now).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(behind)
    }

    pub(super) async fn followed(&self, lease: &Lease) -> Result<(), WorkerError> {
        sqlx::query("DELETE FROM sluice_next WHERE key = ? AND lease = ?")
            .bind(&lease.key)
            .bind(lease.value())
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("forgetting the run queued behind", e))?;
        Ok(())
    }

    pub(super) async fn remember(
        &self,
        tenant: &str,
        key: &str,
        run_id: &str,
    ) -> Result<String, WorkerError> {
        let now = now_ms();
        let k = format!("{tenant}:{key}");
        sqlx::query(
            "INSERT INTO sluice_idempotency (key, run_id, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id, expires_at = excluded.expires_at \
             WHERE sluice_idempotency.expires_at <= ?4",
        )
        .bind(&k)
        .bind(run_id)
        .bind(now + ms(IDEMPOTENCY_TTL))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("recording the idempotency key", e))?;
        sqlx::query_scalar("SELECT run_id FROM sluice_idempotency WHERE key = ?")
            .bind(&k)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_error("reading the idempotency key", e))
    }

    pub(super) async fn save_result(&self, run_id: &str, result: &str) -> Result<(), WorkerError> {
        let now = now_ms();
        sqlx::query("DELETE FROM sluice_job_results WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("expiring job results", e))?;
        sqlx::query(
            "INSERT INTO sluice_job_results (run_id, result, expires_at) VALUES (?, ?, ?) \
             ON CONFLICT (run_id) DO UPDATE SET result = excluded.result, expires_at = excluded.expires_at",
        )
        .bind(run_id)
        .bind(result)
        .bind(now + ms(IDEMPOTENCY_TTL))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("recording the job result", e))?;
        Ok(())
    }

    pub(super) async fn result(&self, run_id: &str) -> Result<Option<String>, WorkerError> {
        sqlx::query_scalar("SELECT result FROM sluice_job_results WHERE run_id = ?")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("reading the job result", e))
    }

    pub(super) async fn last_tick(
        &self,
        tenant: &str,
        pipeline: &str,
    ) -> Result<Option<i64>, WorkerError> {
        sqlx::query_scalar("SELECT tick FROM sluice_ticks WHERE pipeline = ?")
            .bind(format!("{tenant}:{pipeline}"))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("reading the last tick", e))
    }

    pub(super) async fn advance_tick(
        &self,
        tenant: &str,
        pipeline: &str,
        at_ms: i64,
    ) -> Result<(), WorkerError> {
        sqlx::query(
            "INSERT INTO sluice_ticks (pipeline, tick) VALUES (?, ?) \
             ON CONFLICT (pipeline) DO UPDATE SET tick = max(tick, excluded.tick)",
        )
        .bind(format!("{tenant}:{pipeline}"))
        .bind(at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("recording the tick", e))?;
        Ok(())
    }
}

/// The run a live idempotency key `k` names, read in the trigger's transaction.
async fn key_seen(
    tx: &mut sqlx::SqliteConnection,
    k: &str,
    now: i64,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT run_id FROM sluice_idempotency WHERE key = ? AND expires_at > ?")
        .bind(k)
        .bind(now)
        .fetch_optional(tx)
        .await
}

/// Records that idempotency key `k` names `run`, in the trigger's transaction.
async fn record_key(
    tx: &mut sqlx::SqliteConnection,
    k: &str,
    run: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sluice_idempotency (key, run_id, expires_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id, expires_at = excluded.expires_at",
    )
    .bind(k)
    .bind(run)
    .bind(now + ms(IDEMPOTENCY_TTL))
    .execute(tx)
    .await
    .map(|_| ())
}
