//! The command line: the clap types of the top level and the dispatch of each command to
//! its family's file (`sync`, `quarantine`, `finance`, `runs`, `dead_letters`, `queue`,
//! `keys`, `sources`, `tenants`). Handlers print; they never hold a whole result set they
//! can stream.

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_connectors::egress::EgressPolicy;
use sluice_engine::control::KeyRotation;
use sluice_engine::finance_rules::AgingSide;
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::PostgresWarehouse;
use sluice_engine::{SqliteWarehouse, TenantSlug, Warehouse};
use sluice_pipelines::Confinement;
use sluice_workers::retry::RetryPolicy;
use sluice_workers::scheduler::Scheduler;
use sluice_workers::worker::{WorkerEnv, run_workers, shutdown_signal};
use sluice_workers::{QueueSettings, Queues};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod backup;
mod dead_letters;
mod finance;
mod keys;
mod output;
mod pipeline;
mod quarantine;
mod queue;
mod rotate;
mod runs;
mod shell;
mod sources;
mod sync;
mod tenants;
use backup::{BackupArgs, RestoreArgs};
use dead_letters::{DeadLettersCommand, dead_letters_command};
use finance::{
    FinanceCommand, aging, anomalies, cash_flow, dashboard, finance_check, profitability,
};
use keys::{KeyCommand, key_command};
use quarantine::{QuarantineCommand, quarantine};
use queue::{SchedulerCommand, ServeArgs, TriggerArgs, WorkerCommand, serve, trigger};
use rotate::{MasterKeyCommand, master_key_command, rotate_tenant_key};
use runs::{RunsCommand, runs_command};
use shell::{CompletionsArgs, ManArgs};
use sources::{SourceCommand, source_command};
use sync::{SyncArgs, sync};
use tenants::{TenantCommand, tenant};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "ETL for finance data: load invoices, bills and payments into a per-tenant warehouse, quarantining every bad row with its reasons.",
    after_help = "Example:\n  sluice sync examples/invoices.toml\n  sluice quarantine list\n  sluice finance ar-aging --tenant acme --as-of 2024-06-30\n\nExit status:\n  0  the command did what it was asked (a sync: the run succeeded and its accounting balances)\n  1  it did not: a failed run, a dead job, bad input, an unreachable service; the reason is on stderr\n  2  the command line was wrong (an unknown option, a missing argument)\n\nEnvironment: SLUICE_LOG (an EnvFilter for stderr logs), NO_COLOR (no colour on stderr),\nOTEL_EXPORTER_OTLP_ENDPOINT (send traces), SLUICE_MASTER_KEY(_FILE), and each option's SLUICE_* variable."
)]
pub(crate) struct Cli {
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
    /// Connections this process may hold to the PostgreSQL warehouse (1-1000). Size
    /// PostgreSQL's max_connections for every process's pool.
    #[arg(
        long,
        global = true,
        env = "SLUICE_DB_POOL_SIZE",
        default_value_t = sluice_engine::warehouse::DEFAULT_POOL_SIZE,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    db_pool_size: u32,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Nothing on stderr but errors: no progress line, no warnings (results still print on
    /// stdout).
    #[arg(long, short, global = true)]
    pub(crate) quiet: bool,
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
    /// How long one attempt of a job may run before it is stopped, counted as a
    /// transient failure and retried (seconds).
    #[arg(
        long,
        global = true,
        env = "SLUICE_JOB_TIMEOUT",
        default_value_t = 6 * 3600
    )]
    job_timeout: u64,
    /// The directory whose files pipelines defined through the API may read by `path`
    /// (besides the files uploaded to them). Without it they read uploads only.
    #[arg(long, global = true, env = "SLUICE_FILES_ROOT")]
    files_root: Option<PathBuf>,
    /// Hosts and address ranges that pipelines defined through the API may connect to
    /// although they are loopback, private or link-local, comma-separated
    /// (e.g. `erp.internal,10.1.0.0/16`). Public addresses are always allowed.
    #[arg(
        long,
        global = true,
        env = "SLUICE_ALLOW_SOURCE_HOSTS",
        default_value = ""
    )]
    allow_source_hosts: String,
}

impl QueueArgs {
    fn confinement(&self, queue: &QueueSettings) -> Result<Confinement> {
        let egress = EgressPolicy::allowing(&self.allow_source_hosts)?;
        Ok(Confinement::new(
            self.files_root.as_deref(),
            &queue.upload_dir(),
            egress,
        )?)
    }

    fn settings(&self, data_dir: &Path) -> QueueSettings {
        let mut s = QueueSettings::new(self.redis_url.clone(), data_dir.to_path_buf());
        s.prefix = self.queue_prefix.clone();
        s.heartbeat = Duration::from_millis(self.heartbeat_ms.max(1000));
        s.lease_ttl = Duration::from_millis(self.lease_ms.max(300));
        s
    }

    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(self.job_timeout.max(1)),
            ..RetryPolicy::with_base(Duration::from_millis(self.retry_base_ms))
        }
    }
}

/// `--quiet`: no progress display.
pub(super) static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
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
    Worker(WorkerCommand),
    /// Queue syncs of scheduled pipelines when their cron ticks come.
    #[command(after_help = "Example:\n  sluice scheduler --catch-up skip")]
    Scheduler(SchedulerCommand),
    /// Workers, the scheduler and the HTTP API in one process.
    #[command(after_help = "Example:\n  sluice serve --listen 127.0.0.1:8080")]
    Serve(ServeArgs),
    /// API keys: make one (printed once, alone on stdout), list, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check a pipeline's source, or list what it offers.
    #[command(subcommand)]
    Source(SourceCommand),
    /// Provision and list tenants (PostgreSQL warehouse); rotate a tenant's data key.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Rotate the master key that wraps every tenant's data key.
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
    /// Back up the embedded warehouse's data directory, consistently, while it is in use.
    #[command(
        after_help = "Example:\n  sluice --data-dir /var/lib/sluice backup /backups/sluice-$(date +%F)"
    )]
    Backup(BackupArgs),
    /// Restore a backup into the data directory (its processes stopped); every file is
    /// checked against the backup's manifest first.
    #[command(
        after_help = "Example:\n  sluice --data-dir /var/lib/sluice restore /backups/sluice-2026-12-01 --force"
    )]
    Restore(RestoreArgs),
    /// Propose a pipeline file from a sample of a CSV or spreadsheet file.
    #[command(subcommand)]
    Pipeline(pipeline::PipelineCommand),
    /// Print a shell completion script: `source <(sluice completions bash)`.
    #[command(
        after_help = "Example:\n  sluice completions bash > /etc/bash_completion.d/sluice\n  sluice completions zsh > \"${fpath[1]}/_sluice\"\n  sluice completions fish > ~/.config/fish/completions/sluice.fish"
    )]
    Completions(CompletionsArgs),
    /// Print the man page, or write one per command into a directory.
    #[command(
        after_help = "Example:\n  sluice man | man -l -\n  sluice man --dir /usr/local/share/man/man1"
    )]
    Man(ManArgs),
    /// Create or update the control schema and migrate every tenant schema (PostgreSQL).
    #[command(
        after_help = "Example:\n  SLUICE_DATABASE_URL=postgres://sluice@127.0.0.1/sluice sluice migrate"
    )]
    Migrate,
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

pub(crate) async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Completions(args) => return shell::completions(args),
        Command::Man(args) => return shell::man(args),
        _ => {}
    }
    let cli = match cli.command {
        Command::Pipeline(cmd) => {
            let (code, written) = pipeline::pipeline_command(cmd).await?;
            let Some((file, read)) = written else {
                return Ok(code);
            };
            // Then a dry run of what was written (read with the URL's password, if any).
            println!();
            let spec = sluice_pipelines::PipelineSpec::from_file(&file)?;
            let source = sluice_pipelines::PipelineSource::from_spec(
                &read,
                None,
                &sluice_pipelines::SourceReach::unrestricted(),
            )?;
            return sync::dry_run(&spec, &source, false).await;
        }
        other => Cli {
            command: other,
            ..cli
        },
    };
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    let master = MasterKey::from_env_if_set()?;
    let queue = cli.queue.settings(&cli.data_dir);
    let policy = cli.queue.policy();
    let confinement = cli.queue.confinement(&queue)?;
    if let Some(url) = queue
        .redis_url
        .as_ref()
        .filter(|_| cli.command.reads_sources())
    {
        // Workers on many machines share each service account's request limits. Without
        // Redis the commands that need it fail on their own; the others keep going, with
        // limits kept per process.
        if let Err(e) = sluice_workers::rate_gate::share_limits_in_redis(url, &queue.prefix).await {
            tracing::warn!(error = %e, "API request limits are kept per process: Redis is not reachable");
        }
    }
    match cli.database_url.as_deref() {
        Some(url) => {
            let mut warehouse = PostgresWarehouse::connect_with_pool(url, cli.db_pool_size).await?;
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
                other => run_command(Arc::new(warehouse), other, queue, policy, confinement).await,
            }
        }
        None => match cli.command {
            Command::Backup(args) => backup::backup(&cli.data_dir, &args).await,
            Command::Restore(args) => backup::restore(&cli.data_dir, &args).await,
            Command::Tenant(TenantCommand::RotateKey { slug }) => {
                rotate_tenant_key(&embedded(&cli.data_dir, master), &slug).await
            }
            Command::Tenant(_) | Command::Migrate => bail!(
                "`tenant` and `migrate` manage the PostgreSQL warehouse: pass --database-url or set SLUICE_DATABASE_URL (the embedded warehouse creates a tenant's file on its first sync)"
            ),
            Command::Finance(FinanceCommand::Check(_)) => bail!(
                "`finance check` verifies the rollups the PostgreSQL warehouse keeps: pass --database-url or set SLUICE_DATABASE_URL (the embedded warehouse keeps none; it sums its tables)"
            ),
            other => {
                let warehouse = embedded(&cli.data_dir, master);
                run_command(Arc::new(warehouse), other, queue, policy, confinement).await
            }
        },
    }
}

/// The embedded warehouse in `data_dir`, opening secrets with `master` when set.
fn embedded(data_dir: &Path, master: Option<MasterKey>) -> SqliteWarehouse {
    let warehouse = SqliteWarehouse::new(data_dir);
    match master {
        Some(m) => warehouse.with_master_key(m),
        None => warehouse,
    }
}

async fn run_command<W: sluice_engine::Store + KeyRotation>(
    warehouse: Arc<W>,
    command: Command,
    queue: QueueSettings,
    policy: RetryPolicy,
    confinement: Confinement,
) -> Result<ExitCode> {
    let env = |queues: Queues| {
        Arc::new(WorkerEnv::new(
            warehouse.clone(),
            Arc::new(queues),
            policy,
            confinement.clone(),
        ))
    };
    let shared = warehouse.clone();
    let warehouse = &*warehouse;
    match command {
        Command::Trigger(args) => trigger(env(Queues::connect(queue).await?), &args).await,
        Command::Worker(args) => {
            let metrics = args.metrics.listen().await?;
            let worked = run_workers(
                env(Queues::connect(queue).await?),
                &args.worker.options(),
                shutdown_signal(),
            )
            .await;
            if let Some(m) = metrics {
                m.abort();
            }
            worked?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scheduler(args) => {
            let metrics = args.metrics.listen().await?;
            let env = env(Queues::connect(queue).await?);
            let options = args.scheduler.options();
            Scheduler::new(env.warehouse.clone(), env.queues.clone(), options)
                .run(shutdown_signal())
                .await;
            if let Some(m) = metrics {
                m.abort();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(env(Queues::connect(queue).await?), &args).await,
        Command::Key(cmd) => key_command(warehouse, cmd).await,
        Command::Source(cmd) => source_command(shared, cmd).await,
        Command::Runs(cmd) => runs_command(warehouse, cmd).await,
        Command::DeadLetters(cmd) => {
            dead_letters_command(shared, cmd, queue, policy, confinement.clone()).await
        }
        Command::Sync(args) => sync(shared, &args).await,
        Command::Quarantine(cmd) => {
            quarantine(shared, cmd, queue, policy, confinement.clone()).await
        }
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
        Command::MasterKey(cmd) => master_key_command(warehouse, cmd).await,
        Command::Completions(_) | Command::Man(_) | Command::Pipeline(_) => {
            bail!("handled before any warehouse opens")
        }
        Command::Backup(_) | Command::Restore(_) => bail!(
            "`backup` and `restore` copy the embedded warehouse; back up PostgreSQL with pg_dump or a physical backup (docs/operations.md, \"Backups and restores\")"
        ),
        Command::Tenant(_) | Command::Migrate | Command::Finance(FinanceCommand::Check(_)) => {
            bail!("this command needs the PostgreSQL warehouse")
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
