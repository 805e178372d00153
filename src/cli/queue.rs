//! The queued commands: `trigger`, `worker`, `scheduler` and `serve` (API, workers and
//! scheduler in one process).

use super::sync::print_job_report;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use sluice_engine::RunTrigger;
use sluice_engine::control::{PipelineStore, WebhookStore};
use sluice_engine::{JobLedger, TenantSlug, Warehouse};
use sluice_pipelines::{PipelineSpec, RunReport};
use sluice_workers::scheduler::{CatchUp, Scheduler, SchedulerOptions};
use sluice_workers::worker::{WorkerEnv, WorkerOptions, run_workers, shutdown_signal};
use sluice_workers::{IdempotencyKey, JobResult, JobStatus, TriggerOutcome, TriggerRequest};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub(super) struct TriggerArgs {
    /// A pipeline file (registered, or updated, under its name first) or a registered
    /// pipeline's name.
    pipeline: String,
    /// The tenant of a pipeline given by name.
    #[arg(long)]
    tenant: Option<String>,
    /// The same key within 24 hours returns the same run instead of queueing another.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Wait for the run to end and print its accounting, as `sync` does (with the embedded
    /// queue, this process runs the job if no worker takes it).
    #[arg(long)]
    wait: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct WorkerArgs {
    /// Sync jobs run at once by this process.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Quarantine replay jobs run at once by this process (a queue of their own).
    #[arg(long, default_value_t = 1)]
    replay_concurrency: usize,
    /// Webhook deliveries made at once by this process (a queue of their own).
    #[arg(long, default_value_t = 2)]
    webhook_concurrency: usize,
    /// Seconds in-flight jobs may take to finish after SIGTERM/SIGINT; a job still running
    /// then is taken over by another worker and resumes from its last committed batch.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum CatchUpArg {
    /// Forget ticks missed while no scheduler ran.
    Skip,
    /// One run for the latest missed tick.
    One,
}

#[derive(Args)]
pub(super) struct SchedulerArgs {
    /// Ticks missed while no scheduler ran.
    #[arg(long, value_enum, default_value_t = CatchUpArg::One)]
    catch_up: CatchUpArg,
}

/// `sluice worker`: the worker's settings and where its metrics are served.
#[derive(Args)]
pub(super) struct WorkerCommand {
    #[command(flatten)]
    pub(super) worker: WorkerArgs,
    #[command(flatten)]
    pub(super) metrics: MetricsArgs,
}

/// `sluice scheduler`: the scheduler's settings and where its metrics are served.
#[derive(Args)]
pub(super) struct SchedulerCommand {
    #[command(flatten)]
    pub(super) scheduler: SchedulerArgs,
    #[command(flatten)]
    pub(super) metrics: MetricsArgs,
}

#[derive(Args)]
pub(super) struct MetricsArgs {
    /// Serve this process's Prometheus metrics at `http://ADDR/metrics` (`sluice serve`
    /// has them on its API, at /metrics).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args)]
pub(super) struct ServeArgs {
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Largest file `POST /v1/pipelines/{name}/files` accepts, in bytes.
    #[arg(long, default_value_t = 100_000_000)]
    upload_limit: usize,
    /// Bytes of uploaded files each tenant may keep.
    #[arg(long, default_value_t = 10_000_000_000)]
    upload_quota: u64,
    /// Requests per second each API key may make (a token bucket; over it, 429 with
    /// Retry-After).
    #[arg(long, env = "SLUICE_API_RATE", default_value_t = 100.0)]
    rate_per_key: f64,
    /// Requests each API key may make at once before its rate applies.
    #[arg(long, env = "SLUICE_API_BURST", default_value_t = 200.0)]
    burst_per_key: f64,
    /// Seconds between readings of the warehouse-wide metrics (each pipeline's last
    /// success and schedule, open quarantine by rule).
    #[arg(long, default_value_t = 30)]
    metrics_sample_secs: u64,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    scheduler: SchedulerArgs,
}

impl WorkerArgs {
    pub(super) fn options(&self) -> WorkerOptions {
        WorkerOptions {
            concurrency: self.concurrency.max(1),
            replay_concurrency: self.replay_concurrency.max(1),
            webhook_concurrency: self.webhook_concurrency.max(1),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
        }
    }
}

impl SchedulerArgs {
    pub(super) fn options(&self) -> SchedulerOptions {
        SchedulerOptions {
            catch_up: match self.catch_up {
                CatchUpArg::Skip => CatchUp::Skip,
                CatchUpArg::One => CatchUp::One,
            },
            ..SchedulerOptions::default()
        }
    }
}

/// Workers, scheduler and API until SIGTERM/SIGINT.
pub(super) async fn serve<W: sluice_engine::Store>(
    env: Arc<WorkerEnv<W>>,
    args: &ServeArgs,
) -> Result<ExitCode> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut state = sluice_api::AppState::new(
        env.warehouse.clone(),
        env.queues.clone(),
        env.confinement.clone(),
    );
    state.upload_limit = args.upload_limit;
    state.upload_quota = args.upload_quota;
    state.rate = sluice_api::rate_limit::RateLimit {
        burst: args.burst_per_key.max(1.0),
        per_second: args.rate_per_key.max(0.001),
    };
    let state = Arc::new(state);
    let api = tokio::spawn(sluice_api::serve(state, args.listen, stopped()));
    let sampler = tokio::spawn(sluice_workers::metrics::sample_warehouse(
        env.warehouse.clone(),
        Duration::from_secs(args.metrics_sample_secs.max(1)),
    ));
    let scheduler = tokio::spawn(
        Scheduler::new(
            env.warehouse.clone(),
            env.queues.clone(),
            args.scheduler.options(),
        )
        .run(stopped()),
    );
    let options = args.worker.options();
    let workers = run_workers(env, &options, stopped());
    let signal = async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    let (worked, ()) = tokio::join!(workers, signal);
    sampler.abort();
    worked?;
    scheduler.await?;
    api.await?.context("serving the API")?;
    Ok(ExitCode::SUCCESS)
}

/// Registers the pipeline (when given a file), queues a sync, and with `--wait` follows it.
pub(super) async fn trigger<W: Warehouse + PipelineStore + WebhookStore + 'static>(
    env: Arc<WorkerEnv<W>>,
    args: &TriggerArgs,
) -> Result<ExitCode> {
    let path = Path::new(&args.pipeline);
    let (tenant, name) = if path.extension().is_some_and(|e| e == "toml") || path.is_file() {
        let spec = PipelineSpec::from_file(path)?;
        let tenant = TenantSlug::parse(&spec.tenant)?;
        sluice_pipelines::register_pipeline(&*env.warehouse, &spec).await?;
        (tenant, spec.name)
    } else {
        let tenant = args
            .tenant
            .as_deref()
            .context("give --tenant with a pipeline name (or give the pipeline file instead)")?;
        let tenant = TenantSlug::parse(tenant)?;
        if env
            .warehouse
            .pipeline(&tenant, &args.pipeline)
            .await?
            .is_none()
        {
            bail!(
                "pipeline '{}' of tenant '{tenant}' is not registered; trigger its pipeline file once to register it",
                args.pipeline
            );
        }
        (tenant, args.pipeline.clone())
    };
    let triggered = env
        .queues
        .trigger(&TriggerRequest {
            tenant: tenant.to_string(),
            pipeline: name.clone(),
            trigger: RunTrigger::Manual,
            idempotency_key: args.idempotency_key.clone().map(IdempotencyKey::Client),
            correlation_id: None,
            file: None,
        })
        .await?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::to_string(&triggered)?);
        } else {
            let how = match triggered.outcome {
                TriggerOutcome::Enqueued => "queued",
                TriggerOutcome::Joined => "joined the run already queued and not started",
                TriggerOutcome::Repeated => "idempotency key seen before; its run",
            };
            println!("{how}: {}", triggered.run_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    wait_and_report(env, &tenant, &triggered.run_id, args.json).await
}

/// Waits for the job of `run_id`, running it here with the embedded queue when no worker
/// takes it; returns how it ended and its final run's ledger.
pub(super) async fn wait_for_job<W: Warehouse + PipelineStore + WebhookStore + 'static>(
    env: Arc<WorkerEnv<W>>,
    tenant: &TenantSlug,
    run_id: &str,
) -> Result<(JobResult, Option<JobLedger>)> {
    // With the embedded queue there may be no worker: run one here until the run ends.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let local = (!env.queues.is_redis()).then(|| {
        let env = env.clone();
        tokio::spawn(async move {
            let options = WorkerOptions {
                concurrency: 1,
                ..WorkerOptions::default()
            };
            run_workers(env, &options, async move {
                let _ = done_rx.await;
            })
            .await
        })
    });
    let waited = env.queues.wait(run_id, Duration::from_millis(100)).await;
    let _ = done_tx.send(());
    if let Some(worker) = local {
        worker.await??;
    }
    let result = waited?;
    // The job as a whole: an attempt that took over read only what its predecessors left.
    let ledger = match &result.final_run_id {
        Some(_) => env.warehouse.job(tenant, run_id).await?,
        None => None,
    };
    Ok((result, ledger))
}

/// Waits for the job of `run_id` (see [`wait_for_job`]) and prints it as `sync` prints a run:
/// the job whole (counts over its attempts), each attempt beneath.
pub(super) async fn wait_and_report<W: Warehouse + PipelineStore + WebhookStore + 'static>(
    env: Arc<WorkerEnv<W>>,
    tenant: &TenantSlug,
    run_id: &str,
    json_out: bool,
) -> Result<ExitCode> {
    let (result, ledger) = wait_for_job(env, tenant, run_id).await?;
    let final_run = result.final_run_id.clone();
    match (result.status, ledger) {
        (JobStatus::Succeeded, Some(job)) => {
            let ledger = job.whole();
            let duration = ledger
                .finished_at
                .and_then(|f| (f - ledger.started_at).to_std().ok())
                .unwrap_or_default();
            print_job_report(&job, &RunReport { ledger, duration }, json_out);
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            let reason = result.reason.clone().unwrap_or_else(|| "failed".into());
            if json_out {
                println!(
                    "{}",
                    json!({ "run_id": final_run.as_deref().unwrap_or(run_id), "status": "failed",
                            "error": reason, "dead_letter": result.dead_letter })
                );
            }
            eprintln!("error: {reason}");
            if let Some(d) = &result.dead_letter {
                eprintln!("the job is dead: see `sluice dead-letters list`; dead letter {d}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

impl MetricsArgs {
    /// Serves the process's metrics, when asked to, until the task is aborted; a port that
    /// cannot be bound is an error before any work starts.
    pub(super) async fn listen(
        &self,
    ) -> Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(%addr, "metrics listening");
        Ok(Some(tokio::spawn(sluice_api::serve_metrics(listener))))
    }
}
