//! Coordination between triggers, workers and schedulers: pipeline locks, idempotency keys,
//! job results and the scheduler's last fired ticks. In Redis when workers share a Redis
//! ([`RedisLocks`]); in the embedded queue's SQLite file otherwise ([`SqliteCoord`]), with
//! the same semantics: every operation is one atomic statement, so two processes on one
//! machine coordinate as two machines do through Redis.

mod redis;
mod sqlite;

use std::time::Duration;

pub use self::redis::RedisLocks;
pub use self::sqlite::SqliteCoord;

use crate::error::WorkerError;
use crate::metrics::metrics;

/// Locks, idempotency keys, results and ticks, wherever they live.
#[derive(Clone)]
pub enum Coordinator {
    /// Shared by every worker that uses the same Redis.
    Redis(RedisLocks),
    /// Shared by every process that uses the same data directory.
    Sqlite(SqliteCoord),
}

impl Coordinator {
    /// The lease a trigger handed over with a job (its run and token).
    pub fn lease(&self, tenant: &str, pipeline: &str, run_id: &str, token: &str) -> Lease {
        match self {
            Coordinator::Redis(r) => r.lease(tenant, pipeline, run_id, token),
            Coordinator::Sqlite(_) => Lease {
                key: SqliteCoord::lock_key(tenant, pipeline),
                run_id: run_id.to_string(),
                token: token.to_string(),
            },
        }
    }

    /// Takes the (tenant, pipeline) lock for `run_id`, or names the run that has it.
    pub async fn acquire(
        &self,
        tenant: &str,
        pipeline: &str,
        run_id: &str,
        ttl: Duration,
    ) -> Result<Acquired, WorkerError> {
        let got = match self {
            Coordinator::Redis(r) => r.acquire(tenant, pipeline, run_id, ttl).await?,
            Coordinator::Sqlite(s) => s.acquire(tenant, pipeline, run_id, ttl).await?,
        };
        if matches!(got, Acquired::Busy { .. }) {
            metrics().lock_contention.inc();
        }
        Ok(got)
    }

    /// Takes over a lease handed over with a job for the worker `holder`: `Ok` with the
    /// worker's own lease, or `Err` naming the run whose live worker holds the lock.
    pub async fn claim(
        &self,
        lease: &Lease,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lease, String>, WorkerError> {
        let got = match self {
            Coordinator::Redis(r) => r.claim(lease, holder, ttl).await?,
            Coordinator::Sqlite(s) => s.claim(lease, holder, ttl).await?,
        };
        if got.is_err() {
            metrics().lock_contention.inc();
        }
        Ok(got)
    }

    /// Extends our lease; false when it is no longer ours.
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.renew(lease, ttl).await,
            Coordinator::Sqlite(s) => s.renew(lease, ttl).await,
        }
    }

    /// Releases our lease; false when it was not ours any more.
    pub async fn release(&self, lease: &Lease) -> Result<bool, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.release(lease).await,
            Coordinator::Sqlite(s) => s.release(lease).await,
        }
    }

    /// Maps `key` to `run_id` unless it is known (24 hours); returns the run it maps to.
    pub async fn remember(
        &self,
        tenant: &str,
        key: &str,
        run_id: &str,
    ) -> Result<String, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.remember(tenant, key, run_id).await,
            Coordinator::Sqlite(s) => s.remember(tenant, key, run_id).await,
        }
    }

    /// Records how the job of `run_id` ended.
    pub async fn save_result(&self, run_id: &str, result: &str) -> Result<(), WorkerError> {
        match self {
            Coordinator::Redis(r) => r.save_result(run_id, result).await,
            Coordinator::Sqlite(s) => s.save_result(run_id, result).await,
        }
    }

    /// How the job of `run_id` ended, once it has.
    pub async fn result(&self, run_id: &str) -> Result<Option<String>, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.result(run_id).await,
            Coordinator::Sqlite(s) => s.result(run_id).await,
        }
    }

    /// The last tick (Unix ms) fired for a pipeline.
    pub async fn last_tick(
        &self,
        tenant: &str,
        pipeline: &str,
    ) -> Result<Option<i64>, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.last_tick(tenant, pipeline).await,
            Coordinator::Sqlite(s) => s.last_tick(tenant, pipeline).await,
        }
    }

    /// Records that a tick fired (never moves back).
    pub async fn advance_tick(
        &self,
        tenant: &str,
        pipeline: &str,
        at_ms: i64,
    ) -> Result<(), WorkerError> {
        match self {
            Coordinator::Redis(r) => r.advance_tick(tenant, pipeline, at_ms).await,
            Coordinator::Sqlite(s) => s.advance_tick(tenant, pipeline, at_ms).await,
        }
    }
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// A held lock: who holds it and the token that proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The locked key.
    pub key: String,
    /// The run holding the lock.
    pub run_id: String,
    /// Random proof of ownership.
    pub token: String,
}

impl Lease {
    /// What the lock key holds while this lease is held.
    pub fn value(&self) -> String {
        format!("{}|{}", self.run_id, self.token)
    }

    /// The same run's lease once the worker `holder` has taken it over.
    pub fn held_by(&self, holder: &str) -> Lease {
        Lease {
            token: format!("{}|{holder}", self.token),
            ..self.clone()
        }
    }
}

/// Outcome of trying to take a pipeline's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lock is ours.
    Held(Lease),
    /// Another run holds it: join that run.
    Busy {
        /// The run that holds the lock.
        run_id: String,
    },
}
