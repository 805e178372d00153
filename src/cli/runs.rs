//! `sluice runs list | show`: the run ledger.

use super::tenants_to_search;
use anyhow::{Result, bail};
use clap::Subcommand;
use sluice_engine::RunLedger;
use sluice_engine::Warehouse;
use std::process::ExitCode;

#[derive(Subcommand)]
pub(super) enum RunsCommand {
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

pub(super) async fn runs_command<W: Warehouse>(
    warehouse: &W,
    cmd: RunsCommand,
) -> Result<ExitCode> {
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
                    serde_json::to_string(&all.iter().map(RunLedger::to_json).collect::<Vec<_>>())?
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
                if let Some(job) = warehouse.job(&t, &id).await? {
                    found = Some(job);
                    break;
                }
            }
            let Some(job) = found else {
                bail!("no run with id {id}")
            };
            // A job's id shows the job whole; an attempt's id, that attempt.
            let whole = sluice_engine::JobLedger::job_id(&id) == id;
            let l = if whole {
                job.whole()
            } else {
                match job.attempts.iter().find(|a| a.run_id == id) {
                    Some(a) => a.clone(),
                    None => bail!("no run with id {id}"),
                }
            };
            if json {
                if whole {
                    println!("{}", job.to_json());
                } else {
                    println!("{}", l.to_json());
                }
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
                    l.trigger.as_str(),
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
                if whole {
                    super::sync::print_attempts(&job);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
