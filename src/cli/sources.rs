//! `sluice source check | discover`: a pipeline's source, without loading anything.

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use sluice_connectors::Source;
use sluice_engine::control::PipelineStore;
use sluice_pipelines::{PipelineSource, PipelineSpec, SourceReach};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand)]
pub(super) enum SourceCommand {
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

pub(super) async fn source_command<W: PipelineStore + 'static>(
    store: Arc<W>,
    cmd: SourceCommand,
) -> Result<ExitCode> {
    match cmd {
        SourceCommand::Check { pipeline } => {
            let spec = PipelineSpec::from_file(&pipeline)?;
            let report = PipelineSource::for_pipeline(&spec, store, &SourceReach::unrestricted())?
                .check()
                .await?;
            println!("ok: {} ({} ms)", report.detail, report.latency.as_millis());
        }
        SourceCommand::Discover { pipeline, json } => {
            let spec = PipelineSpec::from_file(&pipeline)?;
            let source = PipelineSource::for_pipeline(&spec, store, &SourceReach::unrestricted())?;
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
