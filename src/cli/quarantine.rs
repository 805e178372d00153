//! `sluice quarantine list | show | replay`: the rows a run set aside, why, and where they
//! came from.

use super::output::OutputArgs;
use super::queue::wait_and_report;
use super::tenants_to_search;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use sluice_engine::Store;
use sluice_engine::TenantSlug;
use sluice_engine::quarantine::{QuarantineFilter, QuarantineStatus, QuarantinedRow};
use sluice_pipelines::Confinement;
use sluice_workers::jobs::ReplaySelection;
use sluice_workers::retry::RetryPolicy;
use sluice_workers::worker::WorkerEnv;
use sluice_workers::{QueueSettings, Queues};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand)]
pub(super) enum QuarantineCommand {
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
        /// json: an array of rows; csv or xlsx: a table of them.
        #[command(flatten)]
        out: OutputArgs,
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

/// Runs a `quarantine` command; a replay is queued (and waited for with `--wait`).
pub(super) async fn quarantine<W: Store>(
    warehouse: Arc<W>,
    cmd: QuarantineCommand,
    queue: QueueSettings,
    policy: RetryPolicy,
    confinement: Confinement,
) -> Result<ExitCode> {
    match cmd {
        QuarantineCommand::List {
            tenant,
            run,
            status,
            rule,
            limit,
            out,
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
            for t in tenants_to_search(&*warehouse, tenant.as_deref()).await? {
                rows.extend(warehouse.quarantined(&t, &filter).await?);
            }
            if out.table(|| sluice_api::export::quarantine_table(&rows))? {
                // Written as CSV or XLSX.
            } else if out.is_json() {
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
        QuarantineCommand::Replay {
            tenant,
            pipeline,
            ids,
            run,
            rule,
            wait,
            json,
        } => {
            let env = Arc::new(WorkerEnv::new(
                warehouse.clone(),
                Arc::new(Queues::connect(queue).await?),
                policy,
                confinement,
            ));
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
                return wait_and_report(env, &tenant, &queued.run_id, json).await;
            }
            if json {
                println!("{}", serde_json::to_string(&queued)?);
            } else {
                println!("replay queued: {}", queued.run_id);
            }
        }
        QuarantineCommand::Show { id, tenant, json } => {
            let mut found = None;
            for t in tenants_to_search(&*warehouse, tenant.as_deref()).await? {
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

pub(super) fn position_text(r: &QuarantinedRow) -> String {
    let file = Path::new(&r.position.location).file_name().map_or_else(
        || r.position.location.clone(),
        |f| f.to_string_lossy().into_owned(),
    );
    match &r.position.sheet {
        Some(s) => format!("{file} [{s}] row {}", r.position.row),
        None => format!("{file} line {}", r.position.row),
    }
}
