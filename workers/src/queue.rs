//! The job queues: apalis-redis when `SLUICE_REDIS_URL` is set (any number of workers on
//! any number of machines), otherwise apalis-sqlite in `<data dir>/queue.sqlite` (workers in
//! the same process, or in other processes on the same machine). Syncs, replays and
//! webhook deliveries have queues of their own, so a large replay never starves scheduled
//! syncs and a slow endpoint never holds up either.
//!
//! A trigger takes the pipeline's lock for the run it creates and hands the lock's token to
//! the job; a trigger arriving while that run is queued or running joins it. An idempotency
//! key maps to the run it first produced for 24 hours.

use std::path::PathBuf;
use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use apalis_sqlite::SqliteStorage;
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

use sluice_engine::TenantSlug;
use sluice_engine::control::DeadLetterStore;

use crate::coord::{Acquired, Behind, Lease, RedisLocks, Released};
use crate::coord::{Coordinator, SqliteCoord};
use crate::error::{WorkerError, WorkerErrorKind};
use crate::jobs::{ReplayJob, ReplaySelection, SyncJob};
use sluice_engine::RunTrigger;

/// Which queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueName {
    /// Pipeline syncs.
    Sync,
    /// Replays of quarantined rows.
    Replay,
    /// Webhook deliveries.
    Webhook,
}

impl QueueName {
    /// The label in metrics and the queue's name in the backend.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Sync => "sync",
            QueueName::Replay => "replay",
            QueueName::Webhook => "webhook",
        }
    }
}

/// Where the queues live and how liveness is judged.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Redis, or (absent) the embedded SQLite queue.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (tests use their own).
    pub prefix: String,
    /// The data directory holding `queue.sqlite` in embedded mode.
    pub data_dir: PathBuf,
    /// How often a worker proves it is alive.
    pub heartbeat: Duration,
    /// Heartbeats a worker may miss before its jobs go to another worker.
    pub missed_heartbeats: usize,
    /// How long a running job's pipeline lock lasts without renewal (renewed every third).
    pub lease_ttl: Duration,
    /// How long a queued job's pipeline lock lasts before a worker takes it over.
    pub queued_ttl: Duration,
    /// How long a run that took the lock stays recorded as waiting before anyone else
    /// pushes its job (its own trigger pushes it within moments unless it died).
    pub pending_grace: Duration,
    /// How often an idle worker looks for a new job.
    pub poll_interval: Duration,
}

impl QueueSettings {
    /// Where uploaded files are kept: `<data dir>/uploads/<tenant>/<pipeline>/`.
    pub fn upload_dir(&self) -> PathBuf {
        self.data_dir.join("uploads")
    }

    /// Production defaults: heartbeat 5 s, a worker silent for 3 heartbeats is dead, lock
    /// lease 30 s, queued lock 1 hour, idle workers look for jobs every 200 ms.
    pub fn new(redis_url: Option<String>, data_dir: PathBuf) -> Self {
        QueueSettings {
            redis_url,
            prefix: "sluice".into(),
            data_dir,
            heartbeat: Duration::from_secs(5),
            missed_heartbeats: 3,
            lease_ttl: Duration::from_secs(30),
            queued_ttl: Duration::from_secs(3600),
            pending_grace: Duration::from_secs(5),
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Its run succeeded (after any retries).
    Succeeded,
    /// It failed permanently or ran out of retries: a dead letter holds it.
    Dead,
}

/// How a job ended, for whoever waits on its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// Succeeded or dead.
    pub status: JobStatus,
    /// The run of the last attempt (the successful one, when it succeeded).
    pub final_run_id: Option<String>,
    /// The dead letter, when dead.
    pub dead_letter: Option<String>,
    /// Why it is dead.
    pub reason: Option<String>,
}

/// A request to sync a pipeline.
#[derive(Debug, Clone)]
pub struct TriggerRequest {
    /// The tenant.
    pub tenant: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// Who asks.
    pub trigger: RunTrigger,
    /// The same key for the same pipeline within 24 hours returns the same run.
    pub idempotency_key: Option<IdempotencyKey>,
    /// Follows the work through logs; a fresh one when absent.
    pub correlation_id: Option<String>,
    /// Read this (uploaded) file instead of the pipeline's `path`. Such a sync never joins
    /// another run: it is queued, and runs once the pipeline's lock is free.
    pub file: Option<std::path::PathBuf>,
}

/// Whose idempotency key it is. Keys are remembered per tenant and pipeline, and each kind
/// has its own namespace, so no key a client sends can equal the scheduler's key for a
/// tick or a dead-letter replay's (which would make those silently skip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyKey {
    /// An `Idempotency-Key` header or `--idempotency-key`.
    Client(String),
    /// The scheduler's tick of the pipeline's schedule (milliseconds since the epoch).
    CronTick(i64),
    /// The replay of a dead letter.
    DeadLetter(String),
}

impl IdempotencyKey {
    /// The key as remembered: `<pipeline>/<namespace>:<key>`.
    pub fn scoped(&self, pipeline: &str) -> String {
        match self {
            IdempotencyKey::Client(k) => format!("{pipeline}/client:{k}"),
            IdempotencyKey::CronTick(at) => format!("{pipeline}/cron:{at}"),
            IdempotencyKey::DeadLetter(id) => format!("{pipeline}/dead-letter:{id}"),
        }
    }
}

/// What a trigger did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerOutcome {
    /// A new run was queued: at once, or to start when the running run of the pipeline
    /// ends (a trigger never joins a run that has started reading, since it may have read
    /// past what the trigger asks to see).
    Enqueued,
    /// A run of the pipeline was already queued and not started (first in the queue, or
    /// behind the running one): this is its id.
    Joined,
    /// The idempotency key was seen before: this is the run it produced.
    Repeated,
}

/// A trigger's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Triggered {
    /// The run to follow.
    pub run_id: String,
    /// How it was obtained.
    pub outcome: TriggerOutcome,
}

/// A run queued and not started yet, remembered (as long as job results are) so that
/// whoever follows its id learns it is waiting rather than unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedRun {
    /// The run.
    pub run_id: String,
    /// The tenant.
    pub tenant: String,
    /// The pipeline.
    pub pipeline: String,
    /// What asked for it.
    pub trigger: RunTrigger,
    /// When it was queued.
    pub queued_at: chrono::DateTime<chrono::Utc>,
}

enum Backend {
    Redis(apalis_redis::ConnectionManager),
    Sqlite(SqlitePool),
}

/// The queues and their coordinator.
pub struct Queues {
    settings: QueueSettings,
    backend: Backend,
    coord: Coordinator,
}

/// Runs `step` until it succeeds, up to 8 tries waiting 250 ms, 500 ms, ... (about a
/// minute in all, long enough for a Redis restart); the last failure is returned.
pub(crate) async fn with_backoff<T, F, Fut>(what: &str, mut step: F) -> Result<T, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WorkerError>>,
{
    let mut delay = Duration::from_millis(250);
    for _ in 1..8 {
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::warn!(error = %e, "{what}; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    step().await
}

fn queue_error(context: &str, e: impl std::error::Error + Send + Sync + 'static) -> WorkerError {
    WorkerError::new(WorkerErrorKind::Queue, context).with_source(e)
}

impl Queues {
    /// Connects to Redis, or opens (and sets up) the embedded queue.
    pub async fn connect(settings: QueueSettings) -> Result<Self, WorkerError> {
        match &settings.redis_url {
            Some(url) => {
                let locks = RedisLocks::connect(url, &settings.prefix).await?;
                Ok(Queues {
                    backend: Backend::Redis(locks.connection()),
                    coord: Coordinator::Redis(locks),
                    settings,
                })
            }
            None => {
                std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
                    queue_error(
                        &format!("creating data directory {}", settings.data_dir.display()),
                        e,
                    )
                })?;
                let path = settings.data_dir.join("queue.sqlite");
                let options = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(30));
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options)
                    .await
                    .map_err(|e| queue_error(&format!("opening {}", path.display()), e))?;
                // Processes starting together on a new data directory would each apply the
                // queue's migrations (apalis' sqlx migrations take no lock of their own): the
                // loser failed on `_sqlx_migrations`. One at a time, under a file lock.
                let lock_path = settings.data_dir.join("queue.setup.lock");
                let guard = tokio::task::spawn_blocking(move || {
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&lock_path)?;
                    file.lock()?;
                    Ok::<_, std::io::Error>(file)
                })
                .await
                .map_err(|e| queue_error("locking the embedded queue's setup", e))?
                .map_err(|e| queue_error("locking the embedded queue's setup", e))?;
                SqliteStorage::setup(&pool)
                    .await
                    .map_err(|e| queue_error("setting up the embedded queue", e))?;
                let coord = SqliteCoord::new(pool.clone()).await?;
                drop(guard);
                Ok(Queues {
                    backend: Backend::Sqlite(pool),
                    coord: Coordinator::Sqlite(coord),
                    settings,
                })
            }
        }
    }

    /// Whether the queues are in Redis (shared by machines) rather than embedded.
    pub fn is_redis(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    /// The settings.
    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// Locks, idempotency keys, results and ticks.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coord
    }

    /// Remembers that `run_id` is queued (a failure is logged: it only costs a 404 to
    /// whoever asks before the run starts).
    async fn note_queued(&self, run_id: &str, tenant: &str, pipeline: &str, trigger: RunTrigger) {
        let queued = QueuedRun {
            run_id: run_id.to_string(),
            tenant: tenant.to_string(),
            pipeline: pipeline.to_string(),
            trigger,
            queued_at: chrono::Utc::now(),
        };
        let text = serde_json::to_string(&queued).unwrap_or_default();
        if let Err(e) = self
            .coord
            .save_result(&format!("queued:{run_id}"), &text)
            .await
        {
            tracing::warn!(error = %e, %run_id, "could not remember the queued run");
        }
    }

    /// The queued run `run_id`, if it was queued here (it may have started since: the
    /// ledger has it then).
    pub async fn queued_run(&self, run_id: &str) -> Result<Option<QueuedRun>, WorkerError> {
        let Some(text) = self.coord.result(&format!("queued:{run_id}")).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_str(&text).ok())
    }

    pub(crate) fn redis_config(&self, queue: QueueName) -> apalis_redis::Config {
        apalis_redis::Config::default()
            .queue(format!("{}:{}", self.settings.prefix, queue.as_str()))
            .batch_size(1)
            .heartbeat_interval(self.settings.heartbeat)
            .missed_heartbeats(self.settings.missed_heartbeats)
            .emit_events(false)
    }

    pub(crate) fn sqlite_config(&self, queue: QueueName) -> apalis_sqlite::Config {
        apalis_sqlite::Config::default()
            .queue(queue.as_str())
            .batch_size(1)
            .heartbeat_interval(self.settings.heartbeat)
            .missed_heartbeats(self.settings.missed_heartbeats)
    }

    /// A Redis storage of `queue` (Redis mode only).
    pub(crate) fn redis_storage<T>(&self, queue: QueueName) -> Option<RedisStorage<T>> {
        match &self.backend {
            Backend::Redis(conn) => {
                Some(RedisStorage::new(conn.clone()).with_config(self.redis_config(queue)))
            }
            Backend::Sqlite(_) => None,
        }
    }

    /// A SQLite storage of `queue` (embedded mode only).
    pub(crate) fn sqlite_storage<T>(&self, queue: QueueName) -> Option<SqliteStorage<T>> {
        match &self.backend {
            Backend::Sqlite(pool) => {
                Some(SqliteStorage::new(pool).with_config(self.sqlite_config(queue)))
            }
            Backend::Redis(_) => None,
        }
    }

    /// Puts a sync job on the sync queue.
    pub async fn push_sync(&self, job: SyncJob) -> Result<(), WorkerError> {
        if let Some(mut storage) = self.redis_storage::<SyncJob>(QueueName::Sync) {
            storage
                .push(job)
                .await
                .map_err(|e| queue_error("queueing the sync job in Redis", e))?;
        } else if let Some(mut storage) = self.sqlite_storage::<SyncJob>(QueueName::Sync) {
            storage
                .push(job)
                .await
                .map_err(|e| queue_error("queueing the sync job", e))?;
        }
        Ok(())
    }

    /// Replays a dead sync: queues it again (trigger `replay`) and marks the dead letter
    /// replayed by the run it queued, so that a dead letter is replayed at most once,
    /// whoever asks (the CLI and the API both come here). If the replayed run dies too, it
    /// becomes a dead letter of its own.
    pub async fn replay_dead_letter<W: DeadLetterStore>(
        &self,
        warehouse: &W,
        tenant: &TenantSlug,
        id: &str,
        correlation_id: Option<String>,
    ) -> Result<Triggered, WorkerError> {
        let letter = warehouse
            .dead_letter(tenant, id)
            .await
            .map_err(|e| {
                // A tenant with no warehouse yet has no dead letters: not found, not down.
                let kind = if e.kind() == sluice_engine::ErrorKind::NotFound {
                    WorkerErrorKind::NotFound
                } else {
                    WorkerErrorKind::Queue
                };
                WorkerError::new(kind, "reading the dead letter").with_source(e)
            })?
            .ok_or_else(|| {
                WorkerError::new(
                    WorkerErrorKind::NotFound,
                    format!("no dead letter {id} for tenant {tenant}"),
                )
            })?;
        if let Some(run) = &letter.replay_run {
            return Err(WorkerError::new(
                WorkerErrorKind::Conflict,
                format!("dead letter {id} was already replayed as run {run}"),
            ));
        }
        if letter.job_kind != "sync" {
            return Err(WorkerError::new(
                WorkerErrorKind::Job,
                format!(
                    "dead letter {id} is a {} job: replay its quarantined rows instead",
                    letter.job_kind
                ),
            ));
        }
        let triggered = self
            .trigger(&TriggerRequest {
                tenant: tenant.to_string(),
                pipeline: letter.pipeline.clone(),
                trigger: RunTrigger::Replay,
                // Two admins replaying at once get the same run.
                idempotency_key: Some(IdempotencyKey::DeadLetter(id.to_string())),
                correlation_id,
                file: None,
            })
            .await?;
        warehouse
            .mark_dead_letter_replayed(tenant, id, &triggered.run_id)
            .await
            .map_err(|e| {
                WorkerError::new(WorkerErrorKind::Queue, "marking the dead letter replayed")
                    .with_source(e)
            })?;
        Ok(triggered)
    }

    /// Queues a replay of quarantined rows (on the replay queue, so it never holds up
    /// syncs); returns its run id.
    pub async fn replay(
        &self,
        tenant: &str,
        selection: ReplaySelection,
        correlation_id: Option<String>,
    ) -> Result<Triggered, WorkerError> {
        let job = ReplayJob {
            tenant: tenant.to_string(),
            selection,
            run_id: uuid::Uuid::now_v7().to_string(),
            correlation_id: correlation_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        };
        let run_id = job.run_id.clone();
        self.note_queued(&run_id, tenant, &job.selection.pipeline, RunTrigger::Replay)
            .await;
        if let Some(mut storage) = self.redis_storage::<ReplayJob>(QueueName::Replay) {
            storage
                .push(job)
                .await
                .map_err(|e| queue_error("queueing the replay job in Redis", e))?;
        } else if let Some(mut storage) = self.sqlite_storage::<ReplayJob>(QueueName::Replay) {
            storage
                .push(job)
                .await
                .map_err(|e| queue_error("queueing the replay job", e))?;
        }
        Ok(Triggered {
            run_id,
            outcome: TriggerOutcome::Enqueued,
        })
    }

    /// Jobs waiting in `queue`.
    pub async fn depth(&self, queue: QueueName) -> Result<u64, WorkerError> {
        match &self.backend {
            Backend::Redis(conn) => {
                // New jobs wait in the scheduled set until a worker's fetch moves them to
                // the active list.
                let mut conn = conn.clone();
                let config = self.redis_config(queue);
                let (active, scheduled): (u64, u64) = redis::pipe()
                    .cmd("LLEN")
                    .arg(config.active_jobs_list())
                    .cmd("ZCARD")
                    .arg(config.scheduled_jobs_set())
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| queue_error("reading the queue depth", e))?;
                Ok(active + scheduled)
            }
            Backend::Sqlite(pool) => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM Jobs WHERE job_type = ? AND status = 'Pending'",
                )
                .bind(queue.as_str())
                .fetch_one(pool)
                .await
                .map_err(|e| queue_error("reading the queue depth", e))?;
                Ok(u64::try_from(n).unwrap_or(0))
            }
        }
    }

    /// Queues a sync of a pipeline (behind its running run, if any), or joins the run already
    /// queued and not started, or returns the run an idempotency key produced before.
    pub async fn trigger(&self, req: &TriggerRequest) -> Result<Triggered, WorkerError> {
        let run_id = uuid::Uuid::now_v7().to_string();
        let correlation_id = req
            .correlation_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        if let Some(file) = &req.file {
            self.note_queued(&run_id, &req.tenant, &req.pipeline, req.trigger)
                .await;
            self.push_sync(SyncJob {
                tenant: req.tenant.clone(),
                pipeline: req.pipeline.clone(),
                trigger: req.trigger,
                run_id: run_id.clone(),
                correlation_id,
                lock_token: None,
                file: Some(file.clone()),
            })
            .await?;
            return Ok(Triggered {
                run_id,
                outcome: TriggerOutcome::Enqueued,
            });
        }
        let coord = &self.coord;
        let key = req
            .idempotency_key
            .as_ref()
            .map(|k| k.scoped(&req.pipeline));
        let job = |lease: &Lease| SyncJob {
            tenant: req.tenant.clone(),
            pipeline: req.pipeline.clone(),
            trigger: req.trigger,
            run_id: run_id.clone(),
            correlation_id: correlation_id.clone(),
            lock_token: Some(lease.token.clone()),
            file: None,
        };
        // The lock is taken, or found taken; it may be released between the two steps, so
        // a few rounds (each one a single atomic step).
        for _ in 0..8 {
            let lease = coord.lease(
                &req.tenant,
                &req.pipeline,
                &run_id,
                &uuid::Uuid::new_v4().simple().to_string(),
            );
            let text = serde_json::to_string(&job(&lease))
                .map_err(|e| queue_error("encoding the job", e))?;
            let acquired = coord
                .acquire_queued(
                    &lease,
                    &text,
                    self.settings.queued_ttl,
                    key.as_deref().map(|k| (req.tenant.as_str(), k)),
                )
                .await?;
            match acquired {
                Acquired::Waiting { run_id, job } => {
                    self.push_waiting(&job).await?;
                    return Ok(Triggered {
                        run_id,
                        outcome: TriggerOutcome::Joined,
                    });
                }
                Acquired::Repeated(run_id) => {
                    self.push_pending(&lease.key).await?;
                    return Ok(Triggered {
                        run_id,
                        outcome: TriggerOutcome::Repeated,
                    });
                }
                Acquired::Held(lease) => {
                    self.note_queued(&run_id, &req.tenant, &req.pipeline, req.trigger)
                        .await;
                    // Until `followed`, the job is recorded as waiting: if this push fails
                    // (or this process dies first), the next trigger pushes it.
                    self.push_sync(job(&lease)).await?;
                    if let Err(e) = coord.followed(&lease).await {
                        tracing::warn!(error = %e, "the queued run stays recorded as waiting; a later trigger pushes it again, harmlessly");
                    }
                    tracing::info!(tenant = %req.tenant, pipeline = %req.pipeline, %run_id, trigger = req.trigger.as_str(), "sync queued");
                    return Ok(Triggered {
                        run_id,
                        outcome: TriggerOutcome::Enqueued,
                    });
                }
                Acquired::Busy { run_id: running } => {
                    let behind = coord
                        .queue_behind(
                            &lease,
                            &text,
                            key.as_deref().map(|k| (req.tenant.as_str(), k)),
                        )
                        .await?;
                    let (run_id, outcome) = match behind {
                        Behind::Free => continue,
                        Behind::Queued => {
                            self.note_queued(&run_id, &req.tenant, &req.pipeline, req.trigger)
                                .await;
                            tracing::info!(tenant = %req.tenant, pipeline = %req.pipeline, %run_id, %running, trigger = req.trigger.as_str(), "sync queued behind the running one");
                            (run_id, TriggerOutcome::Enqueued)
                        }
                        Behind::Joined(run) => (run, TriggerOutcome::Joined),
                        Behind::Repeated(run) => (run, TriggerOutcome::Repeated),
                    };
                    if outcome != TriggerOutcome::Enqueued {
                        self.push_pending(&lease.key).await?;
                    }
                    return Ok(Triggered { run_id, outcome });
                }
            }
        }
        Err(WorkerError::new(
            WorkerErrorKind::Queue,
            format!(
                "the lock of pipeline {} kept changing hands; try again",
                req.pipeline
            ),
        ))
    }

    /// Releases a run's lease: the lock is free, or handed over to the run queued behind
    /// this one, whose job is then pushed (retried for about a minute while the queue is
    /// unreachable; until it is pushed, every later release hands it over again). False
    /// when the lease was not ours any more.
    pub async fn release(&self, lease: &Lease) -> Result<bool, WorkerError> {
        let text = match self.coord.release(lease, self.settings.queued_ttl).await? {
            Released::NotOurs => return Ok(false),
            Released::Free => return Ok(true),
            Released::HandedOver(text) => text,
        };
        let job: SyncJob =
            serde_json::from_str(&text).map_err(|e| queue_error("reading a queued job", e))?;
        let next = self.coord.lease(
            &job.tenant,
            &job.pipeline,
            &job.run_id,
            job.lock_token.as_deref().unwrap_or_default(),
        );
        with_backoff("queueing the run that waited behind this one", || {
            self.push_sync(job.clone())
        })
        .await?;
        self.coord.followed(&next).await?;
        tracing::info!(tenant = %job.tenant, pipeline = %job.pipeline, run_id = %job.run_id, "the run that waited behind this one is queued");
        Ok(true)
    }

    /// Pushes the job of the queued run holding the lock `lock_key` if it is still recorded
    /// as waiting (its trigger or the run before it may have died before pushing it); true
    /// when there was one.
    pub async fn push_pending(&self, lock_key: &str) -> Result<bool, WorkerError> {
        let Some(text) = self
            .coord
            .pending(lock_key, self.settings.pending_grace)
            .await?
        else {
            return Ok(false);
        };
        self.push_waiting(&text).await?;
        Ok(true)
    }

    /// Pushes the job (JSON) of a run recorded as waiting, then forgets the record.
    async fn push_waiting(&self, text: &str) -> Result<(), WorkerError> {
        let job: SyncJob =
            serde_json::from_str(text).map_err(|e| queue_error("reading a queued job", e))?;
        let lease = self.coord.lease(
            &job.tenant,
            &job.pipeline,
            &job.run_id,
            job.lock_token.as_deref().unwrap_or_default(),
        );
        self.push_sync(job.clone()).await?;
        self.coord.followed(&lease).await?;
        tracing::info!(tenant = %job.tenant, pipeline = %job.pipeline, run_id = %job.run_id, "a queued run whose job may not have been pushed is pushed");
        Ok(())
    }

    /// Waits until the job of `run_id` has ended (polling every `every`).
    pub async fn wait(&self, run_id: &str, every: Duration) -> Result<JobResult, WorkerError> {
        loop {
            if let Some(text) = self.coord.result(run_id).await? {
                return serde_json::from_str(&text)
                    .map_err(|e| queue_error("reading the job result", e));
            }
            tokio::time::sleep(every).await;
        }
    }
}
