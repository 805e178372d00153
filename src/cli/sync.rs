//! `sluice sync`: one run of a pipeline file, with a progress bar on a terminal and the
//! run's accounting at the end.

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sluice_engine::control::{PipelineStore, WebhookStore};
use sluice_engine::{RowCounts, Warehouse};
use sluice_pipelines::{
    PipelineSource, PipelineSpec, RunObserver, RunOptions, RunReport, SourceReach, run_pipeline,
};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub(super) struct SyncArgs {
    /// The pipeline file (TOML).
    pipeline: PathBuf,
    /// Print exactly one JSON object with the run's accounting.
    #[arg(long)]
    json: bool,
    /// Read, map, validate and dedupe every row into a scratch warehouse that is thrown
    /// away: print what would load and what would be quarantined and why. Nothing is
    /// written to the warehouse (counts are against an empty one).
    #[arg(long)]
    pub(super) dry_run: bool,
}

/// A progress line on stderr: rows read and rows per second.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    pub(super) fn new(enabled: bool) -> Self {
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

    pub(super) fn finish(&self) {
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

pub(super) async fn sync<W: Warehouse + PipelineStore + WebhookStore + 'static>(
    warehouse: Arc<W>,
    args: &SyncArgs,
) -> Result<ExitCode> {
    let spec = PipelineSpec::from_file(&args.pipeline)?;
    let source =
        PipelineSource::for_pipeline(&spec, warehouse.clone(), &SourceReach::unrestricted())?;
    if args.dry_run {
        return dry_run(&spec, &source, args.json).await;
    }
    let warehouse = &*warehouse;
    let quiet = super::QUIET.load(std::sync::atomic::Ordering::Relaxed);
    let progress = Progress::new(!args.json && !quiet && std::io::stderr().is_terminal());
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

/// A finished job's accounting: the job whole as [`print_report`] prints a run, with its
/// attempts (`attempts` in JSON; a line each in text when there were several).
pub(super) fn print_job_report(job: &sluice_engine::JobLedger, report: &RunReport, as_json: bool) {
    if as_json {
        let mut out = job.to_json();
        out["duration_ms"] = json!(report.duration.as_millis() as u64);
        println!("{out}");
        return;
    }
    print_report(report, false);
    print_attempts(job);
}

/// A job's attempts, a line each, when there was more than one.
pub(super) fn print_attempts(job: &sluice_engine::JobLedger) {
    if job.attempts.len() < 2 {
        return;
    }
    println!("  attempts (the counts above are their sums):");
    for (n, a) in job.attempts.iter().enumerate() {
        println!(
            "    {} {} {}: read {}, loaded {}, quarantined {}{}",
            n + 1,
            a.run_id,
            a.status.as_str(),
            a.counts.rows_read,
            a.counts.loaded(),
            a.counts.quarantined,
            a.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
}

/// A finished run's accounting, as `sync` prints it (`--json`: one object).
pub(super) fn print_report(report: &RunReport, as_json: bool) {
    let l = &report.ledger;
    let c = &l.counts;
    if as_json {
        let mut out = l.to_json();
        out["duration_ms"] = json!(report.duration.as_millis() as u64);
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

/// A sync of `spec` into a scratch embedded warehouse, removed afterwards: its accounting,
/// the quarantine per rule and a few quarantined rows with their reasons.
pub(super) async fn dry_run(
    spec: &PipelineSpec,
    source: &PipelineSource,
    as_json: bool,
) -> Result<ExitCode> {
    use sluice_engine::quarantine::QuarantineFilter;
    use sluice_engine::warehouse::QuarantineStore;
    let scratch = std::env::temp_dir().join(format!(
        "sluice-dry-run-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    let _cleanup = RemoveOnDrop(scratch.clone());
    let w = sluice_engine::SqliteWarehouse::new(&scratch);
    let report = match run_pipeline(
        spec,
        source,
        &w,
        &RunOptions::default(),
        &sluice_pipelines::Quiet,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the dry run failed: {}", e.message()),
    };
    let tenant = sluice_engine::TenantSlug::parse(&spec.tenant)?;
    let by_rule = w.run_rule_counts(&tenant, &report.ledger.run_id).await?;
    let examples = w
        .quarantined(
            &tenant,
            &QuarantineFilter {
                run_id: Some(report.ledger.run_id.clone()),
                limit: Some(5),
                ..QuarantineFilter::default()
            },
        )
        .await?;
    let c = &report.ledger.counts;
    if as_json {
        let out = json!({
            "dry_run": true, "pipeline": spec.name, "tenant": spec.tenant,
            "rows_read": c.rows_read, "would_load": c.loaded(),
            "would_quarantine": c.quarantined, "deduplicated": c.deduplicated,
            "quarantined_by_rule": by_rule,
            "examples": examples.iter().map(|r| json!({
                "position": r.position, "errors": r.errors, "raw": r.raw,
            })).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "dry run of {} (nothing was written to the warehouse)",
        spec.name
    );
    println!("  rows read         {}", c.rows_read);
    println!("  would load        {}", c.loaded());
    println!("  would quarantine  {}", c.quarantined);
    println!("  deduplicated      {}", c.deduplicated);
    for (rule, n) in &by_rule {
        println!("    {rule:<28} {n}");
    }
    for r in &examples {
        let why: Vec<String> = r
            .errors
            .iter()
            .map(|e| format!("{} ({}): {}", e.field, e.rule, e.message))
            .collect();
        println!("  row {}: {}", r.position.row, why.join("; "));
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes the scratch directory however the dry run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
