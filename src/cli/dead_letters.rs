//! `sluice dead-letters list | replay`: jobs that died, and their replay.

use super::tenants_to_search;
use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;
use sluice_engine::Store;
use sluice_pipelines::Confinement;
use sluice_pipelines::PipelineSpec;
use sluice_workers::retry::RetryPolicy;
use sluice_workers::worker::WorkerEnv;
use sluice_workers::{JobStatus, QueueSettings, Queues};

use super::queue::wait_for_job;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand)]
pub(super) enum DeadLettersCommand {
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
    /// Replay a dead sync once its cause is fixed: queued again as the API does (with the
    /// usual retries) and waited for; a dead letter is replayed at most once. The job's
    /// pipeline is the registered one, or the file given.
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
        /// Queue the replay and return without waiting for it.
        #[arg(long)]
        no_wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn dead_letters_command<W: Store>(
    shared: Arc<W>,
    cmd: DeadLettersCommand,
    queue: QueueSettings,
    policy: RetryPolicy,
    confinement: Confinement,
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
            no_wait,
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
            PipelineSpec::from_stored(&stored.spec, &stored.secrets)?;
            // The same replay as the API's: queued once, the letter marked by the run.
            let env = Arc::new(WorkerEnv::new(
                shared.clone(),
                Arc::new(Queues::connect(queue).await?),
                policy,
                confinement,
            ));
            let queued = env
                .queues
                .replay_dead_letter(warehouse, &tenant, &id, None)
                .await?;
            if no_wait {
                if json {
                    println!(
                        "{}",
                        json!({ "dead_letter": id, "status": "queued", "run_id": queued.run_id })
                    );
                } else {
                    println!("replay of dead letter {id} queued: {}", queued.run_id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let (result, ledger) = wait_for_job(env, &tenant, &queued.run_id).await?;
            match (result.status, ledger) {
                (JobStatus::Succeeded, Some(job)) => {
                    let ledger = job.whole();
                    if json {
                        println!(
                            "{}",
                            json!({ "dead_letter": id, "status": "replayed", "run": job.to_json() })
                        );
                    } else {
                        println!(
                            "replayed dead letter {id} as run {} ({} rows read)",
                            ledger.run_id, ledger.counts.rows_read
                        );
                    }
                }
                _ => {
                    let reason = result.reason.unwrap_or_else(|| "failed".into());
                    if json {
                        println!(
                            "{}",
                            json!({ "dead_letter": id, "status": "dead", "new_dead_letter": result.dead_letter, "reason": reason })
                        );
                    } else {
                        eprintln!(
                            "the replay failed too ({reason}); new dead letter {}",
                            result.dead_letter.as_deref().unwrap_or("?")
                        );
                    }
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
