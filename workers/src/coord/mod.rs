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

    /// Takes a free lock for the queued `lease` and records `job` (its sync, as JSON) as
    /// waiting until [`Coordinator::followed`] says it is pushed: a trigger that dies (or
    /// whose push fails) between the two leaves the job where the next trigger or a waiting
    /// worker finds it ([`Coordinator::pending`]), never a lock every trigger joins and no
    /// job runs. A run already waiting for a lock nobody holds takes the lock instead:
    /// `Busy` names it.
    /// With an idempotency `key` (already scoped), the key is recorded in the same step, or
    /// `Repeated` names the run it produced before (nothing taken).
    pub async fn acquire_queued(
        &self,
        lease: &Lease,
        job: &str,
        ttl: Duration,
        key: Option<(&str, &str)>,
    ) -> Result<Acquired, WorkerError> {
        let got = match self {
            Coordinator::Redis(r) => r.acquire_queued(lease, Some(job), ttl, key).await?,
            Coordinator::Sqlite(s) => s.acquire_queued(lease, Some(job), ttl, key).await?,
        };
        if matches!(got, Acquired::Busy { .. }) {
            metrics().lock_contention.inc();
        }
        Ok(got)
    }

    /// The job (JSON) of the queued run holding the lock `lock_key` while it is still
    /// recorded as waiting `grace` after it took the lock (handed over, or taken by a
    /// trigger): its push may never have happened. Pushing it again is harmless (a second
    /// copy of a run finds it ended), only wasteful, hence the grace.
    pub async fn pending(
        &self,
        lock_key: &str,
        grace: Duration,
    ) -> Result<Option<String>, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.pending(lock_key, grace).await,
            Coordinator::Sqlite(s) => s.pending(lock_key, grace).await,
        }
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

    /// Releases our lease, handing the lock over to the run queued behind ours (for
    /// `queued_ttl`) when there is one.
    pub async fn release(
        &self,
        lease: &Lease,
        queued_ttl: Duration,
    ) -> Result<Released, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.release(lease, queued_ttl).await,
            Coordinator::Sqlite(s) => s.release(lease, queued_ttl).await,
        }
    }

    /// For a trigger that found the lock taken by `lease`'s pipeline: joins the queued run
    /// holding it, or the run already waiting behind the running one, or queues `job` (the
    /// sync of `lease`'s run, as JSON) to start when the running run releases the lock.
    /// With an idempotency `key` (already scoped), records the run it obtains, or returns
    /// the run the key produced before. One atomic step.
    pub async fn queue_behind(
        &self,
        lease: &Lease,
        job: &str,
        key: Option<(&str, &str)>,
    ) -> Result<Behind, WorkerError> {
        match self {
            Coordinator::Redis(r) => r.queue_behind(lease, job, key).await,
            Coordinator::Sqlite(s) => s.queue_behind(lease, job, key).await,
        }
    }

    /// Forgets the run queued behind another once its job (the lease's run) is in the
    /// queue; until then a later release hands it over again.
    pub async fn followed(&self, lease: &Lease) -> Result<(), WorkerError> {
        match self {
            Coordinator::Redis(r) => r.followed(lease).await,
            Coordinator::Sqlite(s) => s.followed(lease).await,
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

/// What releasing a lease did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// The lock was not ours any more (expired and taken, or gone).
    NotOurs,
    /// The lock is free.
    Free,
    /// The lock now belongs to the run queued behind ours: its job (JSON) must be pushed.
    HandedOver(String),
}

impl Released {
    /// Whether the lease was ours until now.
    pub fn was_ours(&self) -> bool {
        !matches!(self, Released::NotOurs)
    }
}

/// What a trigger that found a pipeline's lock taken obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behind {
    /// The lock was released meanwhile: take it.
    Free,
    /// A run that has not started yet: the queued run holding the lock, or the run already
    /// waiting behind the running one.
    Joined(String),
    /// The trigger's own run now waits behind the running one.
    Queued,
    /// The idempotency key produced this run before.
    Repeated(String),
}

impl Behind {
    fn parse(kind: &str, run: String) -> Result<Self, WorkerError> {
        match kind {
            "free" => Ok(Behind::Free),
            "joined" => Ok(Behind::Joined(run)),
            "queued" => Ok(Behind::Queued),
            "repeated" => Ok(Behind::Repeated(run)),
            other => Err(WorkerError::new(
                crate::error::WorkerErrorKind::Queue,
                format!("unexpected answer {other:?} from the lock script"),
            )),
        }
    }
}

/// Whether a lock value names a run a worker has started (`run|token|holder`), not one
/// still waiting in the queue (`run|token`).
fn started(value: &str) -> bool {
    value.matches('|').count() >= 2
}

/// The run a lock value names.
pub(crate) fn run_of(value: &str) -> String {
    value.split('|').next().unwrap_or_default().to_string()
}

/// Outcome of trying to take a pipeline's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lock is ours.
    Held(Lease),
    /// Another run holds it (queued or running): see [`Coordinator::queue_behind`].
    Busy {
        /// The run that holds the lock.
        run_id: String,
    },
    /// The idempotency key produced this run before; nothing was taken.
    Repeated(String),
    /// The lock was free but a run was waiting for it (the run before it died without
    /// handing over): the lock is now that run's, and its job (JSON) must be pushed.
    Waiting {
        /// The waiting run.
        run_id: String,
        /// Its job.
        job: String,
    },
}

impl Acquired {
    fn parse(lease: &Lease, answer: &[String]) -> Result<Self, WorkerError> {
        match (answer.first().map(String::as_str), answer.get(1)) {
            (Some("held"), _) => Ok(Acquired::Held(lease.clone())),
            (Some("busy"), Some(holder)) => Ok(Acquired::Busy {
                run_id: run_of(holder),
            }),
            (Some("repeated"), Some(run)) => Ok(Acquired::Repeated(run.clone())),
            (Some("waiting"), Some(run)) => Ok(Acquired::Waiting {
                run_id: run.clone(),
                job: answer.get(2).cloned().unwrap_or_default(),
            }),
            other => Err(WorkerError::new(
                crate::error::WorkerErrorKind::Queue,
                format!("unexpected answer {other:?} from the lock script"),
            )),
        }
    }
}
