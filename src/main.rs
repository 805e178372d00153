//! `sluice`: the command line. `sync` runs a pipeline once (on the embedded warehouse, or
//! PostgreSQL with `--database-url`); `quarantine` shows rejected rows; `finance` answers
//! AR/AP aging; `tenant` and `migrate` provision the PostgreSQL warehouse.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sluice_connectors::Source;
use sluice_engine::control::PipelineStore;
use sluice_engine::finance::{AGING_BUCKETS, AgingSide};
use sluice_engine::quarantine::{QuarantineFilter, QuarantineStatus, QuarantinedRow};
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::{RowCounts, SqliteWarehouse, TenantSlug, Warehouse};
use sluice_pipelines::{
    PipelineSource, PipelineSpec, RunObserver, RunOptions, RunReport, run_pipeline,
};
use sluice_workers::jobs::{ReplaySelection, Trigger};
use sluice_workers::retry::RetryPolicy;
use sluice_workers::scheduler::{CatchUp, Scheduler, SchedulerOptions};
use sluice_workers::worker::{WorkerEnv, WorkerOptions, run_workers, shutdown_signal};
use sluice_workers::{QueueSettings, Queues, TriggerOutcome, TriggerRequest};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "ETL for finance data: load invoices, bills and payments into a per-tenant warehouse, quarantining every bad row with its reasons.",
    after_help = "Example:\n  sluice sync examples/invoices.toml\n  sluice quarantine list\n  sluice finance ar-aging --tenant acme --as-of 2024-06-30"
)]
struct Cli {
    /// Where the embedded warehouse keeps one SQLite file per tenant.
    #[arg(
        long,
        global = true,
        env = "SLUICE_DATA_DIR",
        default_value = "./sluice-data"
    )]
    data_dir: PathBuf,
    /// Use the PostgreSQL warehouse at this URL instead of the embedded one
    /// (e.g. postgres://sluice@127.0.0.1:5432/sluice).
    #[arg(
        long,
        global = true,
        env = "SLUICE_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    queue: QueueArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where jobs are queued (used by trigger, worker, scheduler and serve).
#[derive(Args)]
struct QueueArgs {
    /// Queue jobs in Redis (shared by workers on any machine) instead of the embedded
    /// SQLite queue in the data directory (e.g. redis://127.0.0.1:6379).
    #[arg(long, global = true, env = "SLUICE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of every Redis key, to share one Redis between installations.
    #[arg(
        long,
        global = true,
        env = "SLUICE_QUEUE_PREFIX",
        default_value = "sluice"
    )]
    queue_prefix: String,
    /// How often a worker proves it is alive; one silent for 3 beats is dead and its jobs
    /// go to another worker.
    #[arg(
        long,
        global = true,
        env = "SLUICE_HEARTBEAT_MS",
        default_value_t = 5000
    )]
    heartbeat_ms: u64,
    /// How long a running job's pipeline lock lasts without renewal (renewed every third).
    #[arg(long, global = true, env = "SLUICE_LEASE_MS", default_value_t = 30000)]
    lease_ms: u64,
    /// First wait between retries of a transiently failing job (then doubling: 1 s, 2 s,
    /// 4 s, 8 s by default).
    #[arg(
        long,
        global = true,
        env = "SLUICE_RETRY_BASE_MS",
        default_value_t = 1000
    )]
    retry_base_ms: u64,
}

impl QueueArgs {
    fn settings(&self, data_dir: &Path) -> QueueSettings {
        let mut s = QueueSettings::new(self.redis_url.clone(), data_dir.to_path_buf());
        s.prefix = self.queue_prefix.clone();
        s.heartbeat = Duration::from_millis(self.heartbeat_ms.max(1000));
        s.lease_ttl = Duration::from_millis(self.lease_ms.max(300));
        s
    }

    fn policy(&self) -> RetryPolicy {
        RetryPolicy::with_base(Duration::from_millis(self.retry_base_ms))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline once into the warehouse and print its accounting.
    #[command(
        after_help = "Example:\n  sluice sync examples/invoices.toml\n  sluice sync examples/bills.toml --json"
    )]
    Sync(SyncArgs),
    /// Inspect rows that were set aside.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Finance reports from loaded data.
    #[command(subcommand)]
    Finance(FinanceCommand),
    /// The run ledger: what each run read and where every row went.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Jobs that failed for good: list them, replay one after fixing the cause.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Queue a sync of a pipeline (registering the pipeline file first) and print its run id.
    #[command(
        after_help = "Example:\n  sluice trigger examples/invoices.toml --wait\n  sluice --redis-url redis://127.0.0.1:6379 trigger acme-invoices --tenant acme --json"
    )]
    Trigger(TriggerArgs),
    /// Run sync jobs from the queue until SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  sluice --redis-url redis://127.0.0.1:6379 --database-url postgres://127.0.0.1/sluice worker --concurrency 4"
    )]
    Worker(WorkerArgs),
    /// Queue syncs of scheduled pipelines when their cron ticks come.
    #[command(after_help = "Example:\n  sluice scheduler --catch-up skip")]
    Scheduler(SchedulerArgs),
    /// Workers, the scheduler and the HTTP API in one process.
    #[command(after_help = "Example:\n  sluice serve --listen 127.0.0.1:8080")]
    Serve(ServeArgs),
    /// API keys: make one (printed once, alone on stdout), list, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check a pipeline's source, or list what it offers.
    #[command(subcommand)]
    Source(SourceCommand),
    /// Provision and list tenants (PostgreSQL warehouse).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Create or update the control schema and migrate every tenant schema (PostgreSQL).
    #[command(
        after_help = "Example:\n  SLUICE_DATABASE_URL=postgres://sluice@127.0.0.1/sluice sluice migrate"
    )]
    Migrate,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// List runs, newest first, across tenants unless --tenant is given.
    #[command(
        after_help = "Example:\n  sluice runs list --tenant acme --pipeline acme-invoices --json"
    )]
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// At most this many runs per tenant.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one run's accounting.
    #[command(
        after_help = "Example:\n  sluice runs show 0193a6f0-7c1e-7a51-9d4e-3f0a0b1c2d3e --json"
    )]
    Show {
        /// The run id.
        id: String,
        /// Only look in this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// List dead jobs, newest first, with each attempt's error.
    #[command(after_help = "Example:\n  sluice dead-letters list --tenant acme")]
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// At most this many per tenant.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay a dead job once its cause is fixed (with the usual retries); a dead letter is
    /// replayed at most once. The job's pipeline is the registered one, or the file given.
    #[command(
        after_help = "Example:\n  sluice dead-letters replay 0193a6f0-...\n  sluice dead-letters replay 0193a6f0-... --pipeline examples/invoices.toml"
    )]
    Replay {
        /// The dead letter's id.
        id: String,
        /// Only look in this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Register this pipeline file (the fixed definition) and replay with it.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a key of a tenant with a role, or a platform key; prints the key alone.
    #[command(
        after_help = "Example:\n  sluice key create --tenant acme --role operator\n  sluice key create --platform"
    )]
    Create {
        /// The tenant.
        #[arg(long, required_unless_present = "platform")]
        tenant: Option<String>,
        /// viewer, analyst, operator or admin.
        #[arg(long, required_unless_present = "platform")]
        role: Option<String>,
        /// A platform key (no tenant): provisions tenants and their keys.
        #[arg(long, conflicts_with_all = ["tenant", "role"])]
        platform: bool,
        /// A label.
        #[arg(long)]
        name: Option<String>,
    },
    /// List a tenant's keys (or the platform keys): id, prefix, role, revoked.
    List {
        /// The tenant; without it, platform keys.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key.
    Revoke {
        /// The key's id.
        id: String,
        /// Its tenant; without it, a platform key.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
enum SourceCommand {
    /// Connect to the pipeline's source, check the privileges it needs and report latency.
    #[command(after_help = "Example:\n  sluice source check examples/invoices.toml")]
    Check {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
    },
    /// List the source's streams; for a database, every table with its columns and mapped types.
    #[command(after_help = "Example:\n  sluice source discover erp-invoices.toml --json")]
    Discover {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant: its schema, migrated, and its encrypted data key (needs SLUICE_MASTER_KEY).
    #[command(
        after_help = "Example:\n  SLUICE_MASTER_KEY=$(openssl rand -hex 32) sluice --database-url postgres://127.0.0.1/sluice tenant create acme --name \"Acme Corp\""
    )]
    Create {
        /// The slug: 2-40 characters, a lower-case letter first, then a-z, 0-9 or _.
        slug: String,
        /// Display name (defaults to the slug).
        #[arg(long)]
        name: Option<String>,
    },
    /// List tenants.
    #[command(
        after_help = "Example:\n  sluice --database-url postgres://127.0.0.1/sluice tenant list --json"
    )]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct TriggerArgs {
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
struct WorkerArgs {
    /// Sync jobs run at once by this process.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Quarantine replay jobs run at once by this process (a queue of their own).
    #[arg(long, default_value_t = 1)]
    replay_concurrency: usize,
    /// Seconds in-flight jobs may take to finish after SIGTERM/SIGINT; a job still running
    /// then is taken over by another worker and resumes from its last committed batch.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum CatchUpArg {
    /// Forget ticks missed while no scheduler ran.
    Skip,
    /// One run for the latest missed tick.
    One,
}

#[derive(Args)]
struct SchedulerArgs {
    /// Ticks missed while no scheduler ran.
    #[arg(long, value_enum, default_value_t = CatchUpArg::One)]
    catch_up: CatchUpArg,
}

#[derive(Args)]
struct ServeArgs {
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Largest file `POST /v1/pipelines/{name}/files` accepts, in bytes.
    #[arg(long, default_value_t = 100_000_000)]
    upload_limit: usize,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    scheduler: SchedulerArgs,
}

#[derive(Args)]
struct SyncArgs {
    /// The pipeline file (TOML).
    pipeline: PathBuf,
    /// Print exactly one JSON object with the run's accounting.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// List quarantined rows (oldest first), across tenants unless --tenant is given.
    #[command(after_help = "Example:\n  sluice quarantine list --run 0193a6f0-... --json")]
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only rows read by this run.
        #[arg(long)]
        run: Option<String>,
        /// Only rows in this state: pending, fixed, replayed, ignored.
        #[arg(long)]
        status: Option<String>,
        /// Only rows that failed this rule (e.g. balance_within_total).
        #[arg(long)]
        rule: Option<String>,
        /// At most this many rows per tenant.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print JSON (an array of rows).
        #[arg(long)]
        json: bool,
    },
    /// Replay quarantined rows of a pipeline (after fixing the rows or the pipeline): rows
    /// that pass now are loaded and marked replayed, the rest stay pending with their new
    /// errors. Queued on the replay queue; prints the replay's run id.
    #[command(
        after_help = "Example:\n  sluice quarantine replay --tenant acme --pipeline acme-invoices --rule currency_iso4217 --wait"
    )]
    Replay {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The registered pipeline whose rows are replayed.
        #[arg(long)]
        pipeline: String,
        /// Only these rows (repeat the option); default: every pending or fixed row that
        /// matches --run and --rule.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Only rows read by this run.
        #[arg(long)]
        run: Option<String>,
        /// Only rows that failed this rule.
        #[arg(long)]
        rule: Option<String>,
        /// Wait for the replay and print its accounting (with the embedded queue, this
        /// process runs it if no worker does).
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one quarantined row: raw values, errors, source position.
    #[command(
        after_help = "Example:\n  sluice quarantine show 0193a6f0-7c1e-7a51-9d4e-3f0a0b1c2d3e"
    )]
    Show {
        /// The row's id (from `quarantine list`).
        id: String,
        /// Only look in this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FinanceCommand {
    /// Accounts receivable aging: open invoice balances per currency by days past due.
    #[command(
        name = "ar-aging",
        after_help = "Example:\n  sluice finance ar-aging --tenant acme --as-of 2024-06-30 --json"
    )]
    ArAging(AgingArgs),
    /// Accounts payable aging: open bill balances per currency by days past due.
    #[command(
        name = "ap-aging",
        after_help = "Example:\n  sluice finance ap-aging --tenant acme --as-of 2024-06-30"
    )]
    ApAging(AgingArgs),
    /// Cash flow over a period: payments in and out, net, per currency and month.
    #[command(
        name = "cash-flow",
        after_help = "Example:\n  sluice finance cash-flow --tenant acme --from 2024-01-01 --to 2024-06-30 --json"
    )]
    CashFlow(PeriodArgs),
    /// Profitability over a period: revenue, cogs, gross profit and margin, expenses, net
    /// profit, per currency and month.
    #[command(
        after_help = "Example:\n  sluice finance profitability --tenant acme --from 2024-01-01 --to 2024-12-31 --json"
    )]
    Profitability(PeriodArgs),
    /// Anomalies: amount outliers per counterparty, doc numbers used twice, overpayments.
    #[command(after_help = "Example:\n  sluice finance anomalies --tenant acme --json")]
    Anomalies(AnomalyArgs),
    /// Cash flow, AR/AP aging, profitability and the anomaly count, per currency.
    #[command(
        after_help = "Example:\n  sluice finance dashboard --tenant acme --as-of 2024-06-30 --from 2024-01-01 --to 2024-06-30 --json"
    )]
    Dashboard(DashboardArgs),
    /// PostgreSQL only: compares the rollups the dashboard reads with the sums of the tables
    /// they are kept from, and with --repair rebuilds them from the tables.
    #[command(after_help = "Example:\n  sluice finance check --tenant acme --repair")]
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// Rebuild the rollups from the tables when they differ.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
struct AnomalyArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// |robust z-score| above which an amount is an outlier.
    #[arg(long, default_value_t = 3.5)]
    threshold: f64,
    /// Documents a counterparty needs in a currency before its amounts are judged.
    #[arg(long, default_value_t = 5)]
    min_history: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DashboardArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// The aging date (YYYY-MM-DD).
    #[arg(long)]
    as_of: NaiveDate,
    /// First day of the period (YYYY-MM-DD).
    #[arg(long)]
    from: NaiveDate,
    /// Last day of the period (YYYY-MM-DD).
    #[arg(long)]
    to: NaiveDate,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PeriodArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// First day (YYYY-MM-DD).
    #[arg(long)]
    from: NaiveDate,
    /// Last day (YYYY-MM-DD).
    #[arg(long)]
    to: NaiveDate,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AgingArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// The date to age balances at (YYYY-MM-DD).
    #[arg(long)]
    as_of: NaiveDate,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

impl Command {
    /// Whether the command may read a pipeline's source (and so call a service's API).
    fn reads_sources(&self) -> bool {
        matches!(
            self,
            Command::Sync(_)
                | Command::Quarantine(_)
                | Command::DeadLetters(_)
                | Command::Trigger(_)
                | Command::Worker(_)
                | Command::Serve(_)
                | Command::Source(_)
        )
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let master = std::env::var("SLUICE_MASTER_KEY")
        .ok()
        .map(|k| MasterKey::from_hex(&k))
        .transpose()?;
    let queue = cli.queue.settings(&cli.data_dir);
    let policy = cli.queue.policy();
    if let Some(url) = queue
        .redis_url
        .as_ref()
        .filter(|_| cli.command.reads_sources())
    {
        // Workers on many machines share each service account's request limits. Without
        // Redis the commands that need it fail on their own; the others keep going, with
        // limits kept per process.
        if let Err(e) = sluice_workers::gate::share_limits_in_redis(url, &queue.prefix).await {
            tracing::warn!(error = %e, "API request limits are kept per process: Redis is not reachable");
        }
    }
    match cli.database_url.as_deref() {
        Some(url) => {
            let mut warehouse = PostgresWarehouse::connect(url).await?;
            if let Some(m) = master {
                warehouse = warehouse.with_master_key(m);
            }
            match cli.command {
                Command::Tenant(cmd) => tenant(&warehouse, cmd).await,
                Command::Finance(FinanceCommand::Check(a)) => finance_check(&warehouse, &a).await,
                Command::Migrate => {
                    let migrated = warehouse.migrate_all().await?;
                    println!(
                        "control schema up to date; {} tenant schema(s) migrated",
                        migrated.len()
                    );
                    for (slug, from, to) in migrated {
                        println!("  {slug}: {from} -> {to}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => run_command(Arc::new(warehouse), other, queue, policy).await,
            }
        }
        None => match cli.command {
            Command::Tenant(_) | Command::Migrate => bail!(
                "`tenant` and `migrate` manage the PostgreSQL warehouse: pass --database-url or set SLUICE_DATABASE_URL (the embedded warehouse creates a tenant's file on its first sync)"
            ),
            Command::Finance(FinanceCommand::Check(_)) => bail!(
                "`finance check` verifies the rollups the PostgreSQL warehouse keeps: pass --database-url or set SLUICE_DATABASE_URL (the embedded warehouse keeps none; it sums its tables)"
            ),
            other => {
                let mut warehouse = SqliteWarehouse::new(&cli.data_dir);
                if let Some(m) = master {
                    warehouse = warehouse.with_master_key(m);
                }
                run_command(Arc::new(warehouse), other, queue, policy).await
            }
        },
    }
}

async fn run_command<W: sluice_api::Store>(
    warehouse: Arc<W>,
    command: Command,
    queue: QueueSettings,
    policy: RetryPolicy,
) -> Result<ExitCode> {
    let env =
        |queues: Queues| Arc::new(WorkerEnv::new(warehouse.clone(), Arc::new(queues), policy));
    let shared = warehouse.clone();
    let warehouse = &*warehouse;
    match command {
        Command::Trigger(args) => trigger(env(Queues::connect(queue).await?), &args).await,
        Command::Worker(args) => {
            run_workers(
                env(Queues::connect(queue).await?),
                &args.options(),
                shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scheduler(args) => {
            let env = env(Queues::connect(queue).await?);
            Scheduler::new(env.warehouse.clone(), env.queues.clone(), args.options())
                .run(shutdown_signal())
                .await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(env(Queues::connect(queue).await?), &args).await,
        Command::Key(cmd) => key_command(warehouse, cmd).await,
        Command::Quarantine(QuarantineCommand::Replay {
            tenant,
            pipeline,
            ids,
            run,
            rule,
            wait,
            json,
        }) => {
            let env = env(Queues::connect(queue).await?);
            let tenant = TenantSlug::parse(&tenant)?;
            if env.warehouse.pipeline(&tenant, &pipeline).await?.is_none() {
                bail!(
                    "pipeline '{pipeline}' of tenant '{tenant}' is not registered; trigger its pipeline file once to register it"
                );
            }
            let selection = ReplaySelection {
                pipeline,
                ids,
                run_id: run,
                rule,
            };
            let queued = env.queues.replay(tenant.as_str(), selection, None).await?;
            if wait {
                wait_and_report(env, &tenant, &queued.run_id, json).await
            } else {
                if json {
                    println!("{}", serde_json::to_string(&queued)?);
                } else {
                    println!("replay queued: {}", queued.run_id);
                }
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Source(cmd) => source_command(shared, cmd).await,
        Command::Runs(cmd) => runs_command(warehouse, cmd).await,
        Command::DeadLetters(cmd) => dead_letters_command(shared, cmd).await,
        Command::Sync(args) => sync(shared, &args).await,
        Command::Quarantine(cmd) => quarantine(warehouse, cmd).await,
        Command::Finance(FinanceCommand::ArAging(a)) => {
            aging(warehouse, AgingSide::Receivable, &a).await
        }
        Command::Finance(FinanceCommand::ApAging(a)) => {
            aging(warehouse, AgingSide::Payable, &a).await
        }
        Command::Finance(FinanceCommand::CashFlow(a)) => cash_flow(warehouse, &a).await,
        Command::Finance(FinanceCommand::Profitability(a)) => profitability(warehouse, &a).await,
        Command::Finance(FinanceCommand::Anomalies(a)) => anomalies(warehouse, &a).await,
        Command::Finance(FinanceCommand::Dashboard(a)) => dashboard(warehouse, &a).await,
        Command::Tenant(_) | Command::Migrate | Command::Finance(FinanceCommand::Check(_)) => {
            bail!("this command needs the PostgreSQL warehouse")
        }
    }
}

async fn finance_check(warehouse: &PostgresWarehouse, args: &CheckArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let drift = warehouse.check_finance_rollups(&tenant).await?;
    if drift.is_empty() {
        println!("tenant '{tenant}': the finance rollups equal the tables' sums");
        return Ok(ExitCode::SUCCESS);
    }
    for line in &drift {
        println!("{line}");
    }
    if !args.repair {
        println!(
            "tenant '{tenant}': {} rollup group(s) differ from the tables; run again with --repair to rebuild them",
            drift.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    warehouse.rebuild_finance_rollups(&tenant).await?;
    let left = warehouse.check_finance_rollups(&tenant).await?;
    if !left.is_empty() {
        bail!(
            "tenant '{tenant}': {} rollup group(s) still differ after the rebuild",
            left.len()
        );
    }
    println!(
        "tenant '{tenant}': {} rollup group(s) differed; rebuilt from the tables, now equal",
        drift.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn ledger_json(l: &sluice_engine::RunLedger) -> serde_json::Value {
    let c = &l.counts;
    json!({
        "run_id": l.run_id, "tenant": l.tenant, "pipeline": l.pipeline, "entity": l.entity,
        "trigger": l.trigger, "status": l.status, "started_at": l.started_at, "finished_at": l.finished_at,
        "rows_read": c.rows_read, "loaded": c.loaded(), "inserted": c.inserted, "updated": c.updated,
        "unchanged": c.unchanged, "quarantined": c.quarantined, "deduplicated": c.deduplicated,
        "rules_hash": l.rules_hash, "error": l.error,
    })
}

async fn runs_command<W: Warehouse>(warehouse: &W, cmd: RunsCommand) -> Result<ExitCode> {
    match cmd {
        RunsCommand::List {
            tenant,
            pipeline,
            limit,
            json,
        } => {
            let mut all = Vec::new();
            for t in tenants_to_search(warehouse, tenant.as_deref()).await? {
                all.extend(warehouse.runs(&t, pipeline.as_deref(), limit).await?);
            }
            all.sort_by_key(|l| std::cmp::Reverse(l.started_at));
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&all.iter().map(ledger_json).collect::<Vec<_>>())?
                );
            } else {
                println!(
                    "{:<40} {:<10} {:<20} {:<9} {:>9} {:>9} {:>11} {:>12}",
                    "run",
                    "tenant",
                    "pipeline",
                    "status",
                    "read",
                    "loaded",
                    "quarantined",
                    "deduplicated"
                );
                for l in &all {
                    let c = &l.counts;
                    println!(
                        "{:<40} {:<10} {:<20} {:<9} {:>9} {:>9} {:>11} {:>12}",
                        l.run_id,
                        l.tenant,
                        l.pipeline,
                        l.status.as_str(),
                        c.rows_read,
                        c.loaded(),
                        c.quarantined,
                        c.deduplicated
                    );
                }
            }
        }
        RunsCommand::Show { id, tenant, json } => {
            let mut found = None;
            for t in tenants_to_search(warehouse, tenant.as_deref()).await? {
                if let Some(run) = warehouse.run(&t, &id).await? {
                    found = Some(run);
                    break;
                }
            }
            let Some(l) = found else {
                bail!("no run with id {id}")
            };
            if json {
                println!("{}", ledger_json(&l));
            } else {
                let c = &l.counts;
                println!(
                    "run {} ({}), {} -> tenant {}",
                    l.run_id,
                    l.status.as_str(),
                    l.pipeline,
                    l.tenant
                );
                println!(
                    "  trigger {}, started {}, finished {}",
                    l.trigger,
                    l.started_at,
                    l.finished_at
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "-".into())
                );
                println!(
                    "  rows read {}, loaded {} (inserted {}, updated {}, unchanged {}), quarantined {}, deduplicated {}",
                    c.rows_read,
                    c.loaded(),
                    c.inserted,
                    c.updated,
                    c.unchanged,
                    c.quarantined,
                    c.deduplicated
                );
                if let Some(e) = &l.error {
                    println!("  error: {e}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters_command<W: Warehouse + PipelineStore + 'static>(
    shared: Arc<W>,
    cmd: DeadLettersCommand,
) -> Result<ExitCode> {
    let warehouse = &*shared;
    match cmd {
        DeadLettersCommand::List {
            tenant,
            limit,
            json,
        } => {
            let mut all = Vec::new();
            for t in tenants_to_search(warehouse, tenant.as_deref()).await? {
                all.extend(warehouse.dead_letters(&t, limit).await?);
            }
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else if all.is_empty() {
                println!("no dead letters");
            } else {
                for d in &all {
                    let attempts = d.attempts.as_array().map_or(0, Vec::len);
                    let replay = d
                        .replay_run
                        .as_deref()
                        .map(|r| format!(" (replayed as run {r})"))
                        .unwrap_or_default();
                    println!(
                        "{}  {}/{}  {} attempt(s), {}: {}{}",
                        d.id, d.tenant, d.pipeline, attempts, d.created_at, d.reason, replay
                    );
                    if let Some(last) = d.attempts.as_array().and_then(|a| a.last()) {
                        println!("    last error: {}", last["error"].as_str().unwrap_or(""));
                    }
                }
            }
        }
        DeadLettersCommand::Replay {
            id,
            tenant,
            pipeline,
            json,
        } => {
            if let Some(file) = &pipeline {
                let spec = PipelineSpec::from_file(file)?;
                sluice_pipelines::register_pipeline(warehouse, &spec).await?;
            }
            let mut found = None;
            for t in tenants_to_search(warehouse, tenant.as_deref()).await? {
                if let Some(letter) = warehouse.dead_letter(&t, &id).await? {
                    found = Some((t, letter));
                    break;
                }
            }
            let (tenant, letter) = found.with_context(|| format!("no dead letter with id {id}"))?;
            let stored = warehouse
                .pipeline(&tenant, &letter.pipeline)
                .await?
                .with_context(|| {
                    format!(
                        "pipeline '{}' of tenant '{tenant}' is not registered: pass its file with --pipeline",
                        letter.pipeline
                    )
                })?;
            let spec = PipelineSpec::from_stored(&stored.spec, &stored.secrets)?;
            let source = PipelineSource::for_pipeline(&spec, shared.clone())?;
            let outcome = sluice_workers::jobs::replay_dead_letter(
                &tenant,
                &id,
                &spec,
                &source,
                warehouse,
                &sluice_workers::retry::RetryPolicy::default(),
                &sluice_pipelines::Quiet,
            )
            .await?;
            match outcome {
                sluice_workers::jobs::JobOutcome::Succeeded { report, .. } => {
                    if json {
                        println!(
                            "{}",
                            json!({ "dead_letter": id, "status": "replayed", "run": ledger_json(&report.ledger) })
                        );
                    } else {
                        println!(
                            "replayed dead letter {id} as run {} ({} rows read)",
                            report.ledger.run_id, report.ledger.counts.rows_read
                        );
                    }
                }
                sluice_workers::jobs::JobOutcome::Dead {
                    dead_letter,
                    reason,
                    ..
                } => {
                    if json {
                        println!(
                            "{}",
                            json!({ "dead_letter": id, "status": "dead", "new_dead_letter": dead_letter, "reason": reason })
                        );
                    } else {
                        eprintln!(
                            "the replay failed too ({reason}); new dead letter {dead_letter}"
                        );
                    }
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn source_command<W: PipelineStore + 'static>(
    store: Arc<W>,
    cmd: SourceCommand,
) -> Result<ExitCode> {
    match cmd {
        SourceCommand::Check { pipeline } => {
            let spec = PipelineSpec::from_file(&pipeline)?;
            let report = PipelineSource::for_pipeline(&spec, store)?.check().await?;
            println!("ok: {} ({} ms)", report.detail, report.latency.as_millis());
        }
        SourceCommand::Discover { pipeline, json } => {
            let spec = PipelineSpec::from_file(&pipeline)?;
            let source = PipelineSource::for_pipeline(&spec, store)?;
            let listing: Vec<serde_json::Value> = match &source {
                PipelineSource::Sql(sql) => sql
                    .catalog()
                    .await?
                    .into_iter()
                    .map(|t| {
                        json!({ "stream": t.name, "columns": t.columns.iter().map(|c| json!({
                            "name": c.name, "database_type": c.database_type, "nullable": c.nullable,
                            "reads_as": c.reads_as.as_ref().ok(), "unsupported": c.reads_as.as_ref().err(),
                        })).collect::<Vec<_>>() })
                    })
                    .collect(),
                other => other
                    .streams()
                    .await?
                    .into_iter()
                    .map(|s| {
                        json!({ "stream": s.name, "columns": s.schema.fields().iter().map(|f| json!({
                            "name": f.name(), "reads_as": f.data_type().to_string(), "nullable": f.is_nullable(),
                        })).collect::<Vec<_>>() })
                    })
                    .collect(),
            };
            if json {
                println!("{}", serde_json::to_string(&listing)?);
            } else {
                for stream in &listing {
                    println!("{}", stream["stream"].as_str().unwrap_or(""));
                    for c in stream["columns"].as_array().into_iter().flatten() {
                        let reads =
                            c["reads_as"]
                                .as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| {
                                    format!(
                                        "not read: {}",
                                        c["unsupported"].as_str().unwrap_or("unsupported")
                                    )
                                });
                        println!("  {:<32} {}", c["name"].as_str().unwrap_or(""), reads);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tenant(warehouse: &PostgresWarehouse, cmd: TenantCommand) -> Result<ExitCode> {
    match cmd {
        TenantCommand::Create { slug, name } => {
            let tenant = TenantSlug::parse(&slug)?;
            let master = MasterKey::from_env()?;
            let info = warehouse
                .create_tenant(&tenant, name.as_deref().unwrap_or(&slug), &master)
                .await?;
            println!(
                "created tenant {} (schema {}, version {})",
                info.slug, info.schema, info.schema_version
            );
        }
        TenantCommand::List { json } => {
            let tenants = warehouse.list_tenants().await?;
            if json {
                println!("{}", serde_json::to_string(&tenants)?);
            } else {
                for t in &tenants {
                    println!(
                        "{:<40} {:<30} schema {} v{}",
                        t.slug, t.name, t.schema, t.schema_version
                    );
                }
                println!("{} tenant(s)", tenants.len());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress line on stderr: rows read and rows per second.
struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar.set_message("opening source");
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl RunObserver for Progress {
    fn batch_committed(&self, totals: &RowCounts) {
        if let Some(bar) = &self.bar {
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!(
                "{} rows read, {:.0} rows/s ({} quarantined)",
                totals.rows_read,
                totals.rows_read as f64 / secs,
                totals.quarantined
            ));
        }
    }
}

async fn key_command<W: sluice_api::Store>(warehouse: &W, cmd: KeyCommand) -> Result<ExitCode> {
    use sluice_engine::control::{NewApiKey, Role};
    match cmd {
        KeyCommand::Create {
            tenant,
            role,
            platform,
            name,
        } => {
            let (tenant, role) = if platform {
                (None, Role::Platform)
            } else {
                let role = role.as_deref().unwrap_or_default();
                let role = Role::parse(role)
                    .filter(|r| *r != Role::Platform)
                    .with_context(|| {
                        format!("unknown role {role:?}: viewer, analyst, operator or admin")
                    })?;
                (
                    Some(TenantSlug::parse(tenant.as_deref().unwrap_or_default())?),
                    role,
                )
            };
            let made = NewApiKey::generate(tenant.as_ref(), role, name.as_deref())?;
            warehouse.create_key(&made.record).await?;
            warehouse
                .record_audit(
                    "cli",
                    "key.create",
                    tenant.as_ref(),
                    &made.record.id,
                    &json!({ "role": role, "prefix": made.record.prefix }),
                )
                .await?;
            println!("{}", made.secret);
        }
        KeyCommand::List { tenant, json } => {
            let tenant = tenant.as_deref().map(TenantSlug::parse).transpose()?;
            let keys = warehouse.keys(tenant.as_ref()).await?;
            if json {
                println!("{}", serde_json::to_string(&keys)?);
            } else {
                for k in &keys {
                    println!(
                        "{:<36}  slk_{}_…  {:<9} {}{}",
                        k.id,
                        k.prefix,
                        k.role.as_str(),
                        k.created_at,
                        if k.revoked_at.is_some() {
                            "  revoked"
                        } else {
                            ""
                        }
                    );
                }
                println!("{} key(s)", keys.len());
            }
        }
        KeyCommand::Revoke { id, tenant } => {
            let tenant = tenant.as_deref().map(TenantSlug::parse).transpose()?;
            if !warehouse.revoke_key(tenant.as_ref(), &id).await? {
                bail!("no live key {id}");
            }
            warehouse
                .record_audit("cli", "key.revoke", tenant.as_ref(), &id, &json!({}))
                .await?;
            println!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl WorkerArgs {
    fn options(&self) -> WorkerOptions {
        WorkerOptions {
            concurrency: self.concurrency.max(1),
            replay_concurrency: self.replay_concurrency.max(1),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
        }
    }
}

impl SchedulerArgs {
    fn options(&self) -> SchedulerOptions {
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
async fn serve<W: sluice_api::Store>(env: Arc<WorkerEnv<W>>, args: &ServeArgs) -> Result<ExitCode> {
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
        env.queues.settings().data_dir.join("uploads"),
    );
    state.upload_limit = args.upload_limit;
    let state = Arc::new(state);
    let api = tokio::spawn(sluice_api::serve(state, args.listen, stopped()));
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
    worked?;
    scheduler.await?;
    api.await?.context("serving the API")?;
    Ok(ExitCode::SUCCESS)
}

/// Registers the pipeline (when given a file), queues a sync, and with `--wait` follows it.
async fn trigger<W: Warehouse + PipelineStore + 'static>(
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
            trigger: Trigger::Manual,
            idempotency_key: args.idempotency_key.clone(),
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
                TriggerOutcome::Joined => "joined the run already queued or running",
                TriggerOutcome::Repeated => "idempotency key seen before; its run",
            };
            println!("{how}: {}", triggered.run_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    wait_and_report(env, &tenant, &triggered.run_id, args.json).await
}

/// Waits for the job of `run_id` (running it here with the embedded queue when no worker
/// takes it) and prints its final run as `sync` does.
async fn wait_and_report<W: Warehouse + PipelineStore + 'static>(
    env: Arc<WorkerEnv<W>>,
    tenant: &TenantSlug,
    run_id: &str,
    json_out: bool,
) -> Result<ExitCode> {
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
    let final_run = result.final_run_id.clone();
    let ledger = match &final_run {
        Some(run) => env.warehouse.run(tenant, run).await?,
        None => None,
    };
    match (result.status.as_str(), ledger) {
        ("succeeded", Some(ledger)) => {
            let duration = ledger
                .finished_at
                .and_then(|f| (f - ledger.started_at).to_std().ok())
                .unwrap_or_default();
            print_report(&RunReport { ledger, duration }, json_out);
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

async fn sync<W: Warehouse + PipelineStore + 'static>(
    warehouse: Arc<W>,
    args: &SyncArgs,
) -> Result<ExitCode> {
    let spec = PipelineSpec::from_file(&args.pipeline)?;
    let source = PipelineSource::for_pipeline(&spec, warehouse.clone())?;
    let warehouse = &*warehouse;
    let progress = Progress::new(!args.json && std::io::stderr().is_terminal());
    let result = run_pipeline(&spec, &source, warehouse, &RunOptions::default(), &progress).await;
    progress.finish();
    match result {
        Ok(report) => {
            print_report(&report, args.json);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if args.json {
                let out = json!({
                    "run_id": e.run_id(), "status": "failed", "error": e.message(),
                    "retryable": e.is_transient(),
                });
                println!("{out}");
            }
            eprintln!("error: {}", e.message());
            if let Some(run) = e.run_id() {
                eprintln!(
                    "run {run} failed; batches committed before the failure stay, and the next sync resumes after them"
                );
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// A finished run's accounting, as `sync` prints it (`--json`: one object).
fn print_report(report: &RunReport, as_json: bool) {
    let l = &report.ledger;
    let c = &l.counts;
    if as_json {
        let out = json!({
            "run_id": l.run_id, "tenant": l.tenant, "pipeline": l.pipeline, "entity": l.entity,
            "status": l.status, "rows_read": c.rows_read, "loaded": c.loaded(),
            "inserted": c.inserted, "updated": c.updated, "unchanged": c.unchanged,
            "quarantined": c.quarantined, "deduplicated": c.deduplicated,
            "duration_ms": report.duration.as_millis() as u64, "rules_hash": l.rules_hash,
        });
        println!("{out}");
    } else {
        let secs = report.duration.as_secs_f64();
        println!(
            "run {} succeeded in {:.2} s ({:.0} rows/s)",
            l.run_id,
            secs,
            c.rows_read as f64 / secs.max(1e-6)
        );
        println!(
            "  pipeline      {} ({} -> tenant {})",
            l.pipeline, l.entity, l.tenant
        );
        println!("  rows read     {}", c.rows_read);
        println!(
            "  loaded        {}  (inserted {}, updated {}, unchanged {})",
            c.loaded(),
            c.inserted,
            c.updated,
            c.unchanged
        );
        println!("  quarantined   {}", c.quarantined);
        println!("  deduplicated  {}", c.deduplicated);
        if c.quarantined > 0 {
            println!("see why: sluice quarantine list --run {}", l.run_id);
        }
    }
}

async fn tenants_to_search<W: Warehouse>(
    warehouse: &W,
    tenant: Option<&str>,
) -> Result<Vec<TenantSlug>> {
    match tenant {
        Some(t) => Ok(vec![TenantSlug::parse(t)?]),
        None => {
            let all = warehouse.tenants().await?;
            if all.is_empty() {
                bail!(
                    "no tenants in this warehouse yet (run a sync first, or check --data-dir / --database-url)"
                );
            }
            Ok(all)
        }
    }
}

async fn quarantine<W: Warehouse>(warehouse: &W, cmd: QuarantineCommand) -> Result<ExitCode> {
    match cmd {
        QuarantineCommand::List {
            tenant,
            run,
            status,
            rule,
            limit,
            json,
        } => {
            let status = status
                .map(|s| {
                    QuarantineStatus::parse(&s).with_context(|| {
                        format!("unknown status {s:?}: use pending, fixed, replayed or ignored")
                    })
                })
                .transpose()?;
            let filter = QuarantineFilter {
                run_id: run,
                status,
                rule,
                limit: Some(limit),
                ..QuarantineFilter::default()
            };
            let mut rows: Vec<QuarantinedRow> = Vec::new();
            for t in tenants_to_search(warehouse, tenant.as_deref()).await? {
                rows.extend(warehouse.quarantined(&t, &filter).await?);
            }
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else if rows.is_empty() {
                println!("no quarantined rows match");
            } else {
                println!(
                    "{:<36}  {:<10}  {:<8}  {:<32}  errors",
                    "id", "tenant", "status", "source position"
                );
                for r in &rows {
                    let rules: Vec<String> = r
                        .errors
                        .iter()
                        .map(|e| format!("{}:{}", e.field, e.rule))
                        .collect();
                    println!(
                        "{:<36}  {:<10}  {:<8}  {:<32}  {}",
                        r.id,
                        r.tenant,
                        r.status.as_str(),
                        position_text(r),
                        rules.join(", ")
                    );
                }
                println!(
                    "{} row(s); details: sluice quarantine show <id>",
                    rows.len()
                );
            }
        }
        QuarantineCommand::Replay { .. } => {
            bail!("quarantine replay is queued by run_command")
        }
        QuarantineCommand::Show { id, tenant, json } => {
            let mut found = None;
            for t in tenants_to_search(warehouse, tenant.as_deref()).await? {
                if let Some(row) = warehouse.quarantined_row(&t, &id).await? {
                    found = Some(row);
                    break;
                }
            }
            let Some(row) = found else {
                bail!("no quarantined row with id {id}")
            };
            if json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                println!("quarantined row {}", row.id);
                println!("  tenant     {}", row.tenant);
                println!("  pipeline   {} ({})", row.pipeline, row.entity);
                println!("  run        {}", row.run_id);
                println!("  status     {}", row.status.as_str());
                println!("  source     {}", position_text(&row));
                println!("  errors:");
                for e in &row.errors {
                    let value = e
                        .value
                        .as_deref()
                        .map(|v| format!(" (value {v:?})"))
                        .unwrap_or_default();
                    println!("    - {} [{}]{}: {}", e.field, e.rule, value, e.message);
                }
                println!("  raw values:");
                for (k, v) in &row.raw {
                    println!("    {k} = {v}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn position_text(r: &QuarantinedRow) -> String {
    let file = Path::new(&r.position.location).file_name().map_or_else(
        || r.position.location.clone(),
        |f| f.to_string_lossy().into_owned(),
    );
    match &r.position.sheet {
        Some(s) => format!("{file} [{s}] row {}", r.position.row),
        None => format!("{file} line {}", r.position.row),
    }
}

async fn cash_flow<W: Warehouse>(warehouse: &W, args: &PeriodArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let report = sluice_finance::cash_flow_report(warehouse, &tenant, args.from, args.to).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "cash flow for tenant {tenant}, {} to {}",
        args.from, args.to
    );
    if report.currencies.is_empty() {
        println!("no payments in the period");
    }
    for (currency, flow) in &report.currencies {
        println!(
            "{currency:<8}{:>8} {:>18} {:>18} {:>18}",
            "month", "inflow", "outflow", "net"
        );
        for m in &flow.monthly {
            println!(
                "{:<8}{:>8} {:>18} {:>18} {:>18}",
                "", m.month, m.flow.inflow, m.flow.outflow, m.flow.net
            );
        }
        println!(
            "{:<8}{:>8} {:>18} {:>18} {:>18}",
            "", "total", flow.total.inflow, flow.total.outflow, flow.total.net
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn profitability<W: Warehouse>(warehouse: &W, args: &PeriodArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let report =
        sluice_finance::profitability_report(warehouse, &tenant, args.from, args.to).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "profitability for tenant {tenant}, {} to {}",
        args.from, args.to
    );
    if report.currencies.is_empty() {
        println!("no documents in the period");
    }
    let margin =
        |m: Option<rust_decimal::Decimal>| m.map_or_else(|| "-".to_string(), |m| m.to_string());
    for (currency, p) in &report.currencies {
        println!(
            "{currency:<8}{:>8} {:>16} {:>16} {:>16} {:>8} {:>16} {:>16}",
            "month", "revenue", "cogs", "gross profit", "margin", "expenses", "net profit"
        );
        let rows = p.monthly.iter().map(|m| (m.month.as_str(), &m.profit));
        for (label, x) in rows.chain(std::iter::once(("total", &p.total))) {
            println!(
                "{:<8}{label:>8} {:>16} {:>16} {:>16} {:>8} {:>16} {:>16}",
                "",
                x.revenue,
                x.cogs,
                x.gross_profit,
                margin(x.gross_margin),
                x.expenses,
                x.net_profit
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn anomalies<W: Warehouse>(warehouse: &W, args: &AnomalyArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let options = sluice_finance::AnomalyOptions {
        threshold: args.threshold,
        min_history: args.min_history,
    };
    let found = sluice_finance::anomalies_report(warehouse, &tenant, options).await?;
    if args.json {
        println!("{}", serde_json::to_string(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    for a in &found {
        println!(
            "{:<21} {:<8} {:<24} {:>16} {}  {}",
            a.kind, a.side, a.document, a.amount, a.currency, a.why
        );
    }
    println!(
        "{} anomal{}",
        found.len(),
        if found.len() == 1 { "y" } else { "ies" }
    );
    Ok(ExitCode::SUCCESS)
}

async fn dashboard<W: Warehouse>(warehouse: &W, args: &DashboardArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let d = sluice_finance::dashboard(
        warehouse,
        &tenant,
        args.as_of,
        args.from,
        args.to,
        sluice_finance::AnomalyOptions::default(),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "dashboard for tenant {tenant}: aging as of {}, period {} to {}",
        d.as_of, d.from, d.to
    );
    for (c, x) in &d.currencies {
        println!("{c}");
        println!(
            "  cash flow      in {}  out {}  net {}",
            x.cash_flow.inflow, x.cash_flow.outflow, x.cash_flow.net
        );
        println!("  AR open        {}", x.ar_aging.total());
        println!("  AP open        {}", x.ap_aging.total());
        println!(
            "  profitability  revenue {}  gross profit {}  net profit {}",
            x.profitability.revenue, x.profitability.gross_profit, x.profitability.net_profit
        );
        println!("  anomalies      {}", x.anomalies_count);
    }
    Ok(ExitCode::SUCCESS)
}

async fn aging<W: Warehouse>(warehouse: &W, side: AgingSide, args: &AgingArgs) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(&args.tenant)?;
    let report = sluice_finance::aging_report(warehouse, &tenant, side, args.as_of).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let title = match side {
        AgingSide::Receivable => "AR aging",
        AgingSide::Payable => "AP aging",
    };
    println!("{title} for tenant {} as of {}", tenant, args.as_of);
    if report.currencies.is_empty() {
        println!("no open balances");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{:<8}{:<24}", "currency", "counterparty");
    for b in AGING_BUCKETS {
        print!("{b:>16}");
    }
    println!("{:>16}", "total");
    let line = |currency: &str,
                who: &str,
                buckets: &sluice_engine::finance::AgingBuckets,
                total|
     -> Result<()> {
        let values = serde_json::to_value(buckets)?;
        print!("{currency:<8}{who:<24}");
        for b in AGING_BUCKETS {
            print!(
                "{:>16}",
                values.get(b).and_then(|v| v.as_str()).unwrap_or("0")
            );
        }
        println!("{total:>16}");
        Ok(())
    };
    for (currency, a) in &report.currencies {
        for c in &a.counterparties {
            let who = c.name.as_deref().or(c.id.as_deref()).unwrap_or("(none)");
            line(currency, who, &c.buckets, c.total)?;
        }
        line(currency, "all", &a.buckets, a.total)?;
    }
    Ok(ExitCode::SUCCESS)
}
