//! Workers: processes (or tasks of a process) that take sync jobs from the queue and run
//! them. Each worker has a unique name (host, pid, queue, index), proves it is alive with
//! heartbeats, and takes over the jobs of workers that stopped heartbeating. A job's
//! handler never fails in apalis' eyes: the retry policy and dead letters are ours, so
//! apalis' own retries never apply.
//!
//! On SIGTERM or SIGINT a worker stops fetching, lets in-flight jobs finish within the
//! shutdown timeout, and exits; a job still running then is handed back by the heartbeat
//! timeout and resumes, on another worker, from its last committed batch.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis::layers::WorkerBuilderExt;
use apalis::prelude::{
    BackendExt, BoxDynError, Data, Monitor, ParallelizeExt, WorkerBuilder, WorkerContext,
};
use chrono::Utc;
use sluice_engine::control::webhooks::EventType;
use sluice_engine::control::{PipelineOrigin, PipelineStore, WebhookEvent, WebhookStore};
use sluice_engine::quarantine::{QuarantineFilter, QuarantineStatus, QuarantinedRow};
use sluice_engine::{RunStatus, RunTrigger, TenantSlug, Warehouse};
use sluice_pipelines::replay::replay_quarantined_pages;
use sluice_pipelines::{
    Confinement, PipelineError, PipelineErrorKind, PipelineSource, PipelineSpec, Quiet, RunOptions,
};

use crate::coord::Lease;
use crate::error::{WorkerError, WorkerErrorKind};
use crate::jobs::{
    JobOutcome, ReplayJob, ReplaySelection, SyncJob, attempt_run_id, continue_sync_job,
    dead_letter, replay_dead_letter_record,
};
use crate::metrics::metrics;
use crate::poll::EveryInterval;
use crate::queue::{JobResult, JobStatus, QueueName, Queues};
use crate::retry::{Attempt, Outcome, RetryPolicy, continue_with_retries};
use crate::webhooks::{WebhookJob, deliver};

/// What a worker needs to run jobs.
pub struct WorkerEnv<W> {
    /// Where rows go and where pipelines are stored.
    pub warehouse: Arc<W>,
    /// The queues and their coordinator.
    pub queues: Arc<Queues>,
    /// The retry policy.
    pub policy: RetryPolicy,
    /// What pipelines defined through the API may reach.
    pub confinement: Confinement,
    /// Runs being worked on in this process: a job delivered again while its first
    /// delivery still runs here (after a Redis restart) is not run twice.
    running: Mutex<HashSet<String>>,
}

impl<W> WorkerEnv<W> {
    /// Workers over `warehouse` and `queues`, confining API-defined pipelines as
    /// `confinement` says.
    pub fn new(
        warehouse: Arc<W>,
        queues: Arc<Queues>,
        policy: RetryPolicy,
        confinement: Confinement,
    ) -> Self {
        WorkerEnv {
            warehouse,
            queues,
            policy,
            confinement,
            running: Mutex::new(HashSet::new()),
        }
    }
}

/// How many workers, and how long shutdown may take.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Sync jobs run at once by this process.
    pub concurrency: usize,
    /// Replay jobs run at once by this process (their own queue and workers, so replays
    /// never hold up syncs).
    pub replay_concurrency: usize,
    /// Webhook deliveries made at once by this process (their own queue).
    pub webhook_concurrency: usize,
    /// How long in-flight jobs may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 2,
            replay_concurrency: 1,
            webhook_concurrency: 2,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// `host-pid-queue-index`, and `.N` after the worker's Nth restart: unique among the
/// workers of every machine and among the incarnations of one worker. A restarted worker
/// must not reuse its name: a job the dead incarnation had fetched sits in that name's
/// in-flight set, and only a name that stops heartbeating has its jobs handed back.
pub fn worker_name(queue: QueueName, index: usize, restarts: usize) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let name = format!("{host}-{}-{}-{index}", std::process::id(), queue.as_str());
    if restarts == 0 {
        name
    } else {
        format!("{name}.{restarts}")
    }
}

async fn sync_handler<W>(
    job: SyncJob,
    env: Data<Arc<WorkerEnv<W>>>,
    worker: WorkerContext,
) -> Result<(), BoxDynError>
where
    W: Warehouse + PipelineStore + WebhookStore + 'static,
{
    let env: Arc<WorkerEnv<W>> = (*env).clone();
    env.handle_sync(job, worker.name()).await;
    Ok(())
}

async fn replay_handler<W>(job: ReplayJob, env: Data<Arc<WorkerEnv<W>>>) -> Result<(), BoxDynError>
where
    W: Warehouse + PipelineStore + WebhookStore + 'static,
{
    let env: Arc<WorkerEnv<W>> = (*env).clone();
    env.handle_replay(job).await;
    Ok(())
}

async fn webhook_handler<W>(
    job: WebhookJob,
    env: Data<Arc<WorkerEnv<W>>>,
) -> Result<(), BoxDynError>
where
    W: Warehouse + PipelineStore + WebhookStore + 'static,
{
    let env: Arc<WorkerEnv<W>> = (*env).clone();
    env.handle_webhook(job).await;
    Ok(())
}

/// Runs sync, replay and webhook workers until `shutdown` completes, then shuts down gracefully.
pub async fn run_workers<W>(
    env: Arc<WorkerEnv<W>>,
    options: &WorkerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError>
where
    W: Warehouse + PipelineStore + WebhookStore + 'static,
{
    let queues = env.queues.clone();
    let sampler = tokio::spawn(sample_depth(queues.clone()));
    let sweeper = tokio::spawn(sweep_deliveries(env.clone()));
    let concurrency = options.concurrency.max(1);
    let replays = options.replay_concurrency.max(1);
    let webhooks = options.webhook_concurrency.max(1);
    let mut monitor = Monitor::new()
        .shutdown_timeout(options.shutdown_timeout)
        .should_restart(|ctx, error| {
            tracing::warn!(worker = ctx.name(), %error, "worker stopped; restarting it");
            true
        });
    // `count` workers of one queue; the backends differ in type, so a macro, not a fn.
    macro_rules! register {
        ($storage:ident, $job:ty, $queue:expr, $count:expr, $handler:expr) => {{
            let (env, q) = (env.clone(), queues.clone());
            monitor = monitor.register_n($count, move |index, restarts| {
                let storage = q
                    .$storage::<$job>($queue)
                    .unwrap_or_else(|| unreachable!("the queue's backend was checked"))
                    .poll_with_strategy(EveryInterval::new(q.settings().poll_interval));
                WorkerBuilder::new(worker_name($queue, index, restarts))
                    .backend(storage)
                    .concurrency(1)
                    .parallelize(tokio::spawn)
                    .data(env.clone())
                    .build($handler)
            });
        }};
    }
    if queues.is_redis() {
        register!(
            redis_storage,
            SyncJob,
            QueueName::Sync,
            concurrency,
            sync_handler::<W>
        );
        register!(
            redis_storage,
            ReplayJob,
            QueueName::Replay,
            replays,
            replay_handler::<W>
        );
        register!(
            redis_storage,
            WebhookJob,
            QueueName::Webhook,
            webhooks,
            webhook_handler::<W>
        );
    } else {
        register!(
            sqlite_storage,
            SyncJob,
            QueueName::Sync,
            concurrency,
            sync_handler::<W>
        );
        register!(
            sqlite_storage,
            ReplayJob,
            QueueName::Replay,
            replays,
            replay_handler::<W>
        );
        register!(
            sqlite_storage,
            WebhookJob,
            QueueName::Webhook,
            webhooks,
            webhook_handler::<W>
        );
    }
    tracing::info!(
        concurrency,
        replays,
        webhooks,
        queue = if queues.is_redis() {
            "redis"
        } else {
            "embedded"
        },
        "workers started"
    );
    let result = monitor
        .run_with_signal(async move {
            shutdown.await;
            tracing::info!("shutting down: no new jobs; waiting for in-flight jobs");
            Ok(())
        })
        .await;
    sampler.abort();
    sweeper.abort();
    result.map_err(|e| WorkerError::new(WorkerErrorKind::Queue, "workers").with_source(e))
}

/// Samples queue depth into the metrics every few seconds.
async fn sample_depth(queues: Arc<Queues>) {
    loop {
        for q in [QueueName::Sync, QueueName::Replay, QueueName::Webhook] {
            match queues.depth(q).await {
                Ok(n) => metrics()
                    .queue_depth
                    .with_label_values(&[q.as_str()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX)),
                Err(e) => tracing::debug!(error = %e, "sampling queue depth"),
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Queues again, every minute, the webhook deliveries whose jobs were lost.
async fn sweep_deliveries<W: WebhookStore>(env: Arc<WorkerEnv<W>>) {
    loop {
        match env
            .queues
            .sweep_deliveries(&*env.warehouse, crate::webhooks::STALE_AFTER)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deliveries = n, "webhook deliveries queued again"),
            Err(e) => tracing::debug!(error = %e, "sweeping webhook deliveries"),
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

impl<W> WorkerEnv<W>
where
    W: Warehouse + PipelineStore + WebhookStore + 'static,
{
    /// Runs one sync job to its end: takes the pipeline lock over (waiting while another
    /// run holds it), keeps it renewed, runs the sync under the retry policy (continuing
    /// the attempts of an earlier delivery of the same job), records the result, releases
    /// the lock. `holder` names the worker.
    pub async fn handle_sync(&self, job: SyncJob, holder: &str) {
        let fresh = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.run_id.clone());
        if !fresh {
            tracing::info!(run_id = %job.run_id, "job delivered again while it runs in this process; the running delivery finishes it");
            return;
        }
        self.handle_fresh(&job, holder).await;
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.run_id);
    }

    async fn handle_fresh(&self, job: &SyncJob, holder: &str) {
        let span = tracing::info_span!("job", queue = QueueName::Sync.as_str(), tenant = %job.tenant, pipeline = %job.pipeline, run_id = %job.run_id, correlation_id = %job.correlation_id);
        let result = self
            .observed(
                QueueName::Sync,
                &job.run_id,
                span.clone(),
                self.run_locked(job, holder),
            )
            .await;
        let announce = self.announce(&job.tenant, QueueName::Sync, &result, &job.correlation_id);
        tracing::Instrument::instrument(announce, span).await;
    }

    /// Runs a job's work inside its span, counting it in the metrics, and records how it
    /// ended for whoever waits on `run_id`.
    async fn observed(
        &self,
        queue: QueueName,
        run_id: &str,
        span: tracing::Span,
        work: impl Future<Output = JobResult>,
    ) -> JobResult {
        let (m, q) = (metrics(), queue.as_str());
        m.jobs_started.with_label_values(&[q]).inc();
        m.in_flight.with_label_values(&[q]).inc();
        let started = Instant::now();
        let result = tracing::Instrument::instrument(work, span).await;
        match result.status {
            JobStatus::Succeeded => m.jobs_succeeded.with_label_values(&[q]).inc(),
            JobStatus::Dead => {
                m.jobs_dead.with_label_values(&[q]).inc();
                m.record_dead_run();
            }
        }
        m.job_duration
            .with_label_values(&[q])
            .observe(started.elapsed().as_secs_f64());
        m.in_flight.with_label_values(&[q]).dec();
        let text = serde_json::to_string(&result).unwrap_or_default();
        if let Err(e) = self.queues.coordinator().save_result(run_id, &text).await {
            tracing::error!(error = %e, "could not record the job's result");
        }
        result
    }

    async fn run_locked(&self, job: &SyncJob, holder: &str) -> JobResult {
        let coord = self.queues.coordinator().clone();
        let settings = self.queues.settings().clone();
        let token = job
            .lock_token
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let handed_over = coord.lease(&job.tenant, &job.pipeline, &job.run_id, &token);
        let mut waited = 0u32;
        let lease = loop {
            match coord.claim(&handed_over, holder, settings.lease_ttl).await {
                Ok(Ok(lease)) => break lease,
                Ok(Err(other)) => {
                    if waited == 0 {
                        tracing::info!(running = %other, "another run of the pipeline holds its lock; waiting");
                    }
                    // A second copy of this job (pushed again by a recovery) whose run has
                    // ended meanwhile has nothing left to do.
                    if let Ok(Some(text)) = coord.result(&job.run_id).await
                        && let Ok(ended) = serde_json::from_str::<JobResult>(&text)
                    {
                        return ended;
                    }
                    // The run holding the lock may be a queued one whose job its trigger
                    // (or the run before it) died before pushing.
                    if let Err(e) = self.queues.push_pending(&handed_over.key).await {
                        tracing::warn!(error = %e, "pushing the job of the run that holds the lock");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the pipeline lock; retrying");
                    if waited >= 120 {
                        return self
                            .dead(job, &[], &format!("could not take the pipeline lock: {e}"))
                            .await;
                    }
                }
            }
            waited += 1;
            // The lock is often handed over within moments (a release in progress).
            let pause = if waited <= 10 {
                Duration::from_millis(100)
            } else {
                (settings.lease_ttl / 4).min(Duration::from_secs(5))
            };
            tokio::time::sleep(pause).await;
        };
        let renewer = tokio::spawn(keep_renewed(
            coord.clone(),
            handed_over,
            lease.clone(),
            holder.to_string(),
            settings.lease_ttl,
        ));
        let result = self.run_job(job).await;
        renewer.abort();
        // A run queued behind this one starts when the lock is handed over, so a release
        // that fails (the queue's store unreachable) is retried before the lease lapses.
        if let Err(e) = crate::queue::with_backoff("releasing the pipeline lock", || {
            self.queues.release(&lease)
        })
        .await
        {
            tracing::error!(error = %e, "could not release the pipeline lock; it lapses by itself and a run queued behind this one is handed over at the next release");
        }
        result
    }

    async fn run_job(&self, job: &SyncJob) -> JobResult {
        let (mut spec, origin) = match self.patiently(|| self.load_spec(job)).await {
            Ok(loaded) => loaded,
            Err(reason) => return self.dead(job, &[], &reason).await,
        };
        if let Some(file) = &job.file
            && let Err(e) = spec.source.read_file(file.clone())
        {
            return self.dead(job, &[], &e.to_string()).await;
        }
        let prior = match self
            .patiently(|| self.earlier_attempts(&job.tenant, &job.run_id))
            .await
        {
            Ok(Ok(prior)) => prior,
            Ok(Err(done)) => return done,
            Err(e) => return self.dead(job, &[], &e).await,
        };
        let reach = self.confinement.reach(&job.tenant, origin);
        let source = match PipelineSource::for_pipeline(&spec, self.warehouse.clone(), &reach) {
            Ok(s) => s,
            Err(e) => return self.dead(job, &prior, &e.to_string()).await,
        };
        let outcome = continue_sync_job(
            job,
            prior,
            &spec,
            &source,
            &*self.warehouse,
            &self.policy,
            &Quiet,
        )
        .await;
        match outcome {
            Ok(JobOutcome::Succeeded { report, failed }) => {
                let m = metrics();
                m.jobs_failed
                    .with_label_values(&[QueueName::Sync.as_str()])
                    .inc_by(failed.len() as u64);
                m.record_run(RunStatus::Succeeded, &report.ledger.counts);
                JobResult {
                    status: JobStatus::Succeeded,
                    final_run_id: Some(report.ledger.run_id.clone()),
                    dead_letter: None,
                    reason: None,
                }
            }
            Ok(JobOutcome::Dead {
                dead_letter,
                failed,
                reason,
            }) => {
                metrics()
                    .jobs_failed
                    .with_label_values(&[QueueName::Sync.as_str()])
                    .inc_by(failed.len() as u64);
                JobResult {
                    status: JobStatus::Dead,
                    final_run_id: failed.last().map(|a| job.attempt_run_id(a.number)),
                    dead_letter: Some(dead_letter),
                    reason: Some(reason),
                }
            }
            Err(e) => JobResult {
                status: JobStatus::Dead,
                final_run_id: None,
                dead_letter: None,
                reason: Some(e.to_string()),
            },
        }
    }

    /// A job's preparation (its pipeline and earlier attempts, read from the warehouse),
    /// retried with the policy's waits while the warehouse is unavailable: a warehouse
    /// restarting as a job starts is no reason for a dead letter.
    async fn patiently<T, F, Fut>(&self, mut prepare: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Unready>>,
    {
        let mut waits = self.policy.planned_waits().into_iter();
        loop {
            match prepare().await {
                Ok(v) => return Ok(v),
                Err(e) => match waits.next() {
                    Some(wait) if e.transient => {
                        tracing::warn!(reason = %e.reason, "preparing the job; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    _ => return Err(e.reason),
                },
            }
        }
    }

    async fn load_spec(&self, job: &SyncJob) -> Result<(PipelineSpec, PipelineOrigin), Unready> {
        self.stored_spec(&job.tenant, &job.pipeline).await
    }

    async fn stored_spec(
        &self,
        tenant: &str,
        pipeline: &str,
    ) -> Result<(PipelineSpec, PipelineOrigin), Unready> {
        let tenant = TenantSlug::parse(tenant).map_err(|e| e.to_string())?;
        let stored = self
            .warehouse
            .pipeline(&tenant, pipeline)
            .await?
            .ok_or_else(|| {
                format!(
                    "pipeline '{pipeline}' of tenant '{tenant}' is not registered (run `sluice trigger <pipeline.toml>` to register it)"
                )
            })?;
        let spec =
            PipelineSpec::from_stored(&stored.spec, &stored.secrets).map_err(|e| e.to_string())?;
        Ok((spec, stored.origin))
    }

    /// The attempts an earlier delivery of this job already made, read from the ledger. A
    /// run left `running` belonged to a worker that died: it is closed as failed. When an
    /// earlier attempt succeeded (the worker died after the run, before acknowledging the
    /// job), the job is done: `Err(result)`.
    /// The attempts an earlier delivery of the job of `job_run` made (a running one, whose
    /// worker died, is closed as failed), or how the job ended if one succeeded.
    async fn earlier_attempts(
        &self,
        tenant: &str,
        job_run: &str,
    ) -> Result<Result<Vec<Attempt>, JobResult>, Unready> {
        let tenant = TenantSlug::parse(tenant).map_err(|e| e.to_string())?;
        self.warehouse.prepare_tenant(&tenant).await?;
        let mut prior = Vec::new();
        for number in 1..=self.policy.attempts.max(1) as u32 + 1 {
            let run_id = attempt_run_id(job_run, number);
            let Some(ledger) = self.warehouse.run(&tenant, &run_id).await? else {
                break;
            };
            let error = match ledger.status {
                RunStatus::Succeeded => {
                    return Ok(Err(JobResult {
                        status: JobStatus::Succeeded,
                        final_run_id: Some(run_id),
                        dead_letter: None,
                        reason: None,
                    }));
                }
                RunStatus::Running => {
                    let msg = "the worker running this attempt stopped (no heartbeat); the job was taken over by another worker";
                    self.warehouse
                        .finish_run(&tenant, &run_id, RunStatus::Failed, Some(msg))
                        .await?;
                    tracing::warn!(attempt = number, run = %run_id, "took over a job whose worker died");
                    msg.to_string()
                }
                _ => ledger.error.clone().unwrap_or_else(|| "failed".into()),
            };
            prior.push(Attempt {
                number,
                at: ledger.started_at,
                error,
                transient: true,
            });
        }
        Ok(Ok(prior))
    }

    /// Runs one replay job: selects the rows (again for each attempt, so an attempt never
    /// touches rows an earlier one settled), replays them under the retry policy, records
    /// the result.
    pub async fn handle_replay(&self, job: ReplayJob) {
        let span = tracing::info_span!("job", queue = QueueName::Replay.as_str(), tenant = %job.tenant, pipeline = %job.selection.pipeline, run_id = %job.run_id, correlation_id = %job.correlation_id);
        let result = self
            .observed(
                QueueName::Replay,
                &job.run_id,
                span.clone(),
                self.run_replay(&job),
            )
            .await;
        let announce = self.announce(&job.tenant, QueueName::Replay, &result, &job.correlation_id);
        tracing::Instrument::instrument(announce, span).await;
    }

    /// Makes one webhook delivery (every attempt the retry policy allows).
    pub async fn handle_webhook(&self, job: WebhookJob) {
        let span = tracing::info_span!("job", queue = QueueName::Webhook.as_str(), tenant = %job.tenant, delivery = %job.delivery_id, correlation_id = %job.correlation_id);
        let work = async {
            let (m, q) = (metrics(), QueueName::Webhook.as_str());
            m.jobs_started.with_label_values(&[q]).inc();
            m.in_flight.with_label_values(&[q]).inc();
            let started = Instant::now();
            let reach = self.confinement.reach(&job.tenant, PipelineOrigin::Api);
            match deliver(&*self.warehouse, reach.egress(), &self.policy, &job).await {
                Ok(sluice_engine::control::DeliveryStatus::Failed) => {
                    m.jobs_dead.with_label_values(&[q]).inc()
                }
                Ok(_) => m.jobs_succeeded.with_label_values(&[q]).inc(),
                Err(e) => {
                    // The store was unreachable: the delivery stays pending and the sweep
                    // queues it again.
                    m.jobs_failed.with_label_values(&[q]).inc();
                    tracing::error!(error = %e, "webhook delivery could not be made");
                }
            }
            m.job_duration
                .with_label_values(&[q])
                .observe(started.elapsed().as_secs_f64());
            m.in_flight.with_label_values(&[q]).dec();
        };
        tracing::Instrument::instrument(work, span).await;
    }

    /// Records the events of a job that ended and queues their webhook deliveries:
    /// `run.succeeded` (or `quarantine.replayed` for a replay) and `run.quarantined` for
    /// the run that succeeded, `run.failed` for the last attempt of a dead job,
    /// `dead_letter.created` for its dead letter. Each event has a key of its own, so a job
    /// delivered twice announces once.
    async fn announce(
        &self,
        tenant: &str,
        queue: QueueName,
        result: &JobResult,
        correlation: &str,
    ) {
        let Ok(tenant) = TenantSlug::parse(tenant) else {
            return;
        };
        // Most tenants have no endpoints: then nothing is read for events nobody wants.
        match self.warehouse.webhooks(&tenant).await {
            Ok(endpoints) if endpoints.is_empty() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "listing webhook endpoints; recording the events anyway")
            }
        }
        let mut events = Vec::new();
        if let Some(run_id) = &result.final_run_id {
            match self.warehouse.run(&tenant, run_id).await {
                Ok(Some(ledger)) => {
                    let data = serde_json::to_value(ledger.view()).unwrap_or_default();
                    match result.status {
                        JobStatus::Succeeded => {
                            let done = if queue == QueueName::Replay {
                                EventType::QuarantineReplayed
                            } else {
                                EventType::RunSucceeded
                            };
                            events.push(WebhookEvent::new(done, run_id, data.clone()));
                            let mut set_aside =
                                WebhookEvent::new(EventType::RunQuarantined, run_id, data);
                            set_aside.quarantined = ledger.counts.quarantined;
                            events.push(set_aside);
                        }
                        JobStatus::Dead => {
                            events.push(WebhookEvent::new(EventType::RunFailed, run_id, data))
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, run = %run_id, "reading the run for its webhook events")
                }
            }
        }
        if let Some(id) = &result.dead_letter {
            match self.warehouse.dead_letter(&tenant, id).await {
                Ok(Some(letter)) => events.push(WebhookEvent::new(
                    EventType::DeadLetterCreated,
                    id,
                    serde_json::to_value(&letter).unwrap_or_default(),
                )),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, dead_letter = %id, "reading the dead letter for its webhook event")
                }
            }
        }
        for event in &events {
            if let Err(e) = self
                .queues
                .emit(&*self.warehouse, &tenant, event, correlation)
                .await
            {
                tracing::error!(error = %e, event = %event.key, "webhook event not recorded");
            }
        }
    }

    async fn run_replay(&self, job: &ReplayJob) -> JobResult {
        let spec = match self
            .patiently(|| self.stored_spec(&job.tenant, &job.selection.pipeline))
            .await
        {
            Ok((spec, _)) => spec,
            Err(reason) => return self.dead_replay(job, &[], &reason).await,
        };
        // A delivery after a worker died continues the attempts of the one before.
        let prior = match self
            .patiently(|| self.earlier_attempts(&job.tenant, &job.run_id))
            .await
        {
            Ok(Ok(prior)) => prior,
            Ok(Err(done)) => return done,
            Err(e) => return self.dead_replay(job, &[], &e).await,
        };
        let (outcome, _) = continue_with_retries(
            &self.policy,
            prior,
            |n| {
                let spec = &spec;
                async move {
                    let tenant = TenantSlug::parse(&job.tenant)?;
                    let pages = Arc::new(tokio::sync::Mutex::new(ReplayPages::new(
                        &job.selection,
                        spec.batch_rows(),
                    )));
                    let next = || {
                        let (pages, tenant) = (pages.clone(), tenant.clone());
                        async move { pages.lock().await.next(&*self.warehouse, &tenant).await }
                    };
                    let options = RunOptions {
                        trigger: RunTrigger::Replay,
                        run_id: Some(attempt_run_id(&job.run_id, n)),
                    };
                    replay_quarantined_pages(spec, &*self.warehouse, next, &options).await
                }
            },
            PipelineError::is_transient,
        )
        .await;
        match outcome {
            Outcome::Succeeded { value, failed } => {
                metrics()
                    .jobs_failed
                    .with_label_values(&[QueueName::Replay.as_str()])
                    .inc_by(failed.len() as u64);
                metrics().record_run(RunStatus::Succeeded, &value.ledger.counts);
                JobResult {
                    status: JobStatus::Succeeded,
                    final_run_id: Some(value.ledger.run_id),
                    dead_letter: None,
                    reason: None,
                }
            }
            Outcome::Dead { failed, reason } => self.dead_replay(job, &failed, &reason).await,
        }
    }

    /// The pending or fixed rows the selection names.
    async fn dead_replay(&self, job: &ReplayJob, failed: &[Attempt], reason: &str) -> JobResult {
        let mut attempts = failed.to_vec();
        if attempts.is_empty() {
            attempts.push(Attempt {
                number: 1,
                at: Utc::now(),
                error: reason.to_string(),
                transient: false,
            });
        }
        let letter = replay_dead_letter_record(job, &attempts, reason);
        self.record_dead(letter, failed.last().map(|a| a.number), &job.run_id, reason)
            .await
    }

    async fn record_dead(
        &self,
        letter: sluice_engine::control::DeadLetter,
        last_attempt: Option<u32>,
        run_id: &str,
        reason: &str,
    ) -> JobResult {
        let id = letter.id.clone();
        tracing::error!(%reason, dead_letter = %id, "job is dead");
        let recorded = self.warehouse.record_dead_letter(&letter).await;
        if let Err(e) = &recorded {
            tracing::error!(error = %e, "could not record the dead letter");
        } else {
            metrics().dead_letters.inc();
        }
        JobResult {
            status: JobStatus::Dead,
            final_run_id: last_attempt.map(|n| {
                if n <= 1 {
                    run_id.to_string()
                } else {
                    format!("{run_id}.{n}")
                }
            }),
            dead_letter: recorded.ok().map(|()| id),
            reason: Some(reason.to_string()),
        }
    }

    async fn dead(&self, job: &SyncJob, failed: &[Attempt], reason: &str) -> JobResult {
        let mut attempts = failed.to_vec();
        if attempts.is_empty() {
            attempts.push(Attempt {
                number: 1,
                at: Utc::now(),
                error: reason.to_string(),
                transient: false,
            });
        }
        let letter = dead_letter(job, &attempts, reason);
        self.record_dead(letter, None, &job.run_id, reason).await
    }
}

/// Renews the lease every third of its time to live until aborted. A lease that expired
/// (Redis was unreachable for longer than the lease) is taken again when still free.
/// The rows a replay job selects, a page at a time (selected again for each attempt, so
/// an attempt never touches rows an earlier one settled): the listed ids, or the pipeline's
/// pending then fixed rows (of a run, of a rule), by id after the last one read. Only the
/// current page is in memory.
struct ReplayPages {
    selection: ReplaySelection,
    page_rows: usize,
    /// Ids still to read, when the job lists them.
    ids: std::collections::VecDeque<String>,
    /// 0: pending rows, 1: fixed rows, 2: done.
    stage: usize,
    after: Option<String>,
}

impl ReplayPages {
    fn new(selection: &ReplaySelection, page_rows: usize) -> Self {
        ReplayPages {
            ids: selection.ids.iter().cloned().collect(),
            selection: selection.clone(),
            page_rows: page_rows.clamp(1, 10_000),
            stage: 0,
            after: None,
        }
    }

    fn open(&self, r: &QuarantinedRow) -> bool {
        r.pipeline == self.selection.pipeline
            && matches!(
                r.status,
                QuarantineStatus::Pending | QuarantineStatus::Fixed
            )
    }

    /// The next non-empty page, or an empty one when the selection is exhausted.
    async fn next<W: Warehouse>(
        &mut self,
        warehouse: &W,
        tenant: &TenantSlug,
    ) -> Result<Vec<QuarantinedRow>, PipelineError> {
        if !self.selection.ids.is_empty() {
            let mut rows = Vec::new();
            while rows.is_empty() && !self.ids.is_empty() {
                let take = self.page_rows.min(self.ids.len());
                for id in self.ids.drain(..take).collect::<Vec<_>>() {
                    let row = warehouse
                        .quarantined_row(tenant, &id)
                        .await?
                        .ok_or_else(|| {
                            PipelineError::new(
                                PipelineErrorKind::Config,
                                format!("no quarantined row {id} in tenant {tenant}"),
                            )
                        })?;
                    if self.open(&row) {
                        rows.push(row);
                    }
                }
            }
            return Ok(rows);
        }
        while self.stage < 2 {
            let status = [QuarantineStatus::Pending, QuarantineStatus::Fixed][self.stage];
            let filter = QuarantineFilter {
                run_id: self.selection.run_id.clone(),
                status: Some(status),
                rule: self.selection.rule.clone(),
                limit: Some(self.page_rows as u32),
                pipeline: Some(self.selection.pipeline.clone()),
                after: self.after.clone(),
                ..QuarantineFilter::default()
            };
            let page = warehouse.quarantined(tenant, &filter).await?;
            let Some(last) = page.last() else {
                self.stage += 1;
                self.after = None;
                continue;
            };
            self.after = Some(last.id.clone());
            let rows: Vec<QuarantinedRow> = page.into_iter().filter(|r| self.open(r)).collect();
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
        Ok(Vec::new())
    }
}

async fn keep_renewed(
    coord: crate::coord::Coordinator,
    handed_over: Lease,
    lease: Lease,
    holder: String,
    ttl: Duration,
) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        match coord.renew(&lease, ttl).await {
            Ok(true) => {}
            Ok(false) => match coord.claim(&handed_over, &holder, ttl).await {
                Ok(Ok(_)) => {
                    tracing::info!(run = %lease.run_id, "the pipeline lock had expired; taken again")
                }
                Ok(Err(other)) => {
                    tracing::warn!(run = %lease.run_id, %other, "the pipeline lock was taken by another run; the commit fence protects the load")
                }
                Err(e) => tracing::warn!(error = %e, "taking the pipeline lock again"),
            },
            Err(e) => tracing::warn!(error = %e, "renewing the pipeline lock"),
        }
    }
}

/// Why a job could not be prepared, and whether that may pass.
struct Unready {
    reason: String,
    transient: bool,
}

impl From<sluice_engine::EngineError> for Unready {
    fn from(e: sluice_engine::EngineError) -> Self {
        Unready {
            transient: e.kind().is_transient(),
            reason: e.to_string(),
        }
    }
}

impl From<String> for Unready {
    fn from(reason: String) -> Self {
        Unready {
            reason,
            transient: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_worker_takes_a_new_name() {
        let first = worker_name(QueueName::Sync, 0, 0);
        let again = worker_name(QueueName::Sync, 0, 1);
        assert!(first.ends_with("-sync-0"), "{first}");
        assert_eq!(again, format!("{first}.1"));
        assert_ne!(worker_name(QueueName::Replay, 0, 0), first);
    }
}
