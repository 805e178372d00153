//! The runner: source -> map/validate/dedupe -> warehouse, one batch at a time.
//!
//! A reader thread parses the source, a blocking task maps and validates the next batch
//! while the previous one commits, and each commit carries the batch's rows, its quarantined
//! rows, the ledger's counts and the stream's cursor in one fenced transaction. A crash at
//! any point leaves the warehouse at a batch boundary; the next run resumes from there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use sluice_connectors::{ReadRequest, Source, SyncMode};
use sluice_engine::validate::RuleSet;
use sluice_engine::warehouse::{LoadBatch, LoadStore, RunScope};
use sluice_engine::{ErrorKind, RowCounts, RunLedger, RunStatus, RunTrigger, TenantSlug};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::error::{PipelineError, PipelineErrorKind};
use crate::map::Mapper;
use crate::spec::PipelineSpec;
use crate::stages::prepare_batch;

/// How a run was asked for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// What started the run.
    pub trigger: RunTrigger,
    /// Use this run id instead of a new one (a queued job knows its run id in advance).
    pub run_id: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            trigger: RunTrigger::Cli,
            run_id: None,
        }
    }
}

/// Told about progress while a run goes; for progress bars and metrics.
pub trait RunObserver: Send + Sync {
    /// A batch committed; `totals` are the run's counts so far.
    fn batch_committed(&self, totals: &RowCounts);
}

/// An observer that ignores everything.
pub struct Quiet;

impl RunObserver for Quiet {
    fn batch_committed(&self, _totals: &RowCounts) {}
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The ledger as the warehouse stored it.
    pub ledger: RunLedger,
    /// Wall time of the run.
    pub duration: Duration,
}

/// Runs one sync of `spec` from `source` into `warehouse`.
///
/// Succeeds only when every record read is loaded, quarantined or deduplicated and the
/// counts add up; otherwise the run is recorded as failed with the reason, and whatever
/// batches committed stay committed for the next run to resume after.
pub async fn run_pipeline<S: Source, W: LoadStore>(
    spec: &PipelineSpec,
    source: &S,
    warehouse: &W,
    options: &RunOptions,
    observer: &dyn RunObserver,
) -> Result<RunReport, PipelineError> {
    let started = Instant::now();
    let tenant = TenantSlug::parse(&spec.tenant)?;
    let rules = RuleSet::new(spec.entity, &spec.rules)?;
    let run_id = begin_run(spec, warehouse, &tenant, &rules, options).await?;
    let span =
        tracing::info_span!("run", tenant = %tenant, pipeline = %spec.name, run_id = %run_id);
    async {
        let outcome = execute(spec, source, warehouse, &tenant, &run_id, rules, observer).await;
        end_run(warehouse, &tenant, &run_id, outcome, started).await
    }
    .instrument(span)
    .await
}

/// Records a run of `spec` as started (after preparing the tenant) and returns its id.
pub(crate) async fn begin_run<W: LoadStore>(
    spec: &PipelineSpec,
    warehouse: &W,
    tenant: &TenantSlug,
    rules: &RuleSet,
    options: &RunOptions,
) -> Result<String, PipelineError> {
    warehouse.prepare_tenant(tenant).await?;
    let run_id = options
        .run_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    warehouse
        .begin_run(&RunLedger {
            run_id: run_id.clone(),
            tenant: tenant.to_string(),
            pipeline: spec.name.clone(),
            entity: spec.entity.name().to_string(),
            trigger: options.trigger,
            started_at: Utc::now(),
            finished_at: None,
            status: RunStatus::Running,
            counts: RowCounts::default(),
            rules_hash: rules.hash(),
            error: None,
        })
        .await?;
    Ok(run_id)
}

/// Ends a run: it succeeds only when the counted totals balance and equal the ledger the
/// warehouse stored; otherwise it is recorded as failed with the reason.
pub(crate) async fn end_run<W: LoadStore>(
    warehouse: &W,
    tenant: &TenantSlug,
    run_id: &str,
    outcome: Result<RowCounts, PipelineError>,
    started: Instant,
) -> Result<RunReport, PipelineError> {
    let outcome =
        outcome.and_then(|totals| totals.check().map(|()| totals).map_err(PipelineError::from));
    match outcome {
        Ok(totals) => {
            let stored = warehouse
                .finish_run(tenant, run_id, RunStatus::Succeeded, None)
                .await?;
            if stored.counts != totals {
                let msg = format!(
                    "ledger disagrees with the run: stored {:?}, counted {:?}",
                    stored.counts, totals
                );
                tracing::error!(%msg, "accounting mismatch");
                warehouse
                    .finish_run(tenant, run_id, RunStatus::Failed, Some(&msg))
                    .await?;
                return Err(PipelineError::new(
                    PipelineErrorKind::Engine(ErrorKind::AccountingMismatch),
                    msg,
                )
                .in_run(run_id));
            }
            tracing::info!(
                rows_read = totals.rows_read,
                loaded = totals.loaded(),
                quarantined = totals.quarantined,
                deduplicated = totals.deduplicated,
                "run succeeded"
            );
            Ok(RunReport {
                ledger: stored,
                duration: started.elapsed(),
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "run failed");
            if let Err(record) = warehouse
                .finish_run(tenant, run_id, RunStatus::Failed, Some(&e.message()))
                .await
            {
                tracing::error!(error = %record, "could not record the failed run");
            }
            Err(e.in_run(run_id))
        }
    }
}

async fn execute<S: Source, W: LoadStore>(
    spec: &PipelineSpec,
    source: &S,
    warehouse: &W,
    tenant: &TenantSlug,
    run_id: &str,
    rules: RuleSet,
    observer: &dyn RunObserver,
) -> Result<RowCounts, PipelineError> {
    let stream = source.streams().await?.into_iter().next().ok_or_else(|| {
        PipelineError::new(
            PipelineErrorKind::Config,
            "the source offers no stream to read",
        )
    })?;
    let required: Vec<&str> = spec.rules.require.iter().map(String::as_str).collect();
    let mapper = Mapper::new(
        spec.entity,
        &spec.mapping,
        &required,
        &stream.schema,
        spec.decimal_format()?,
        spec.time_format()?,
    )?;
    let mapper = match spec.soft_delete_column() {
        Some(column) => mapper.with_soft_delete(column, &stream.schema)?,
        None => mapper,
    };
    let scope = RunScope {
        tenant: tenant.clone(),
        pipeline: spec.name.clone(),
        stream: stream.name.clone(),
        run_id: run_id.to_string(),
        rules_hash: rules.hash(),
    };
    let state = warehouse
        .stream_state(tenant, &spec.name, &stream.name)
        .await?;
    if state.cursor.is_some() {
        tracing::info!(stream = %stream.name, "resuming after the last committed batch");
    }
    let mut version = state.version;
    let batches = source
        .read(ReadRequest {
            stream: stream.name.clone(),
            from: state.cursor,
            batch_rows: spec.batch_rows(),
        })
        .await?;

    let (tx, mut rx) = mpsc::channel::<Result<LoadBatch, PipelineError>>(2);
    let (mapper, rules, entity) = (Arc::new(mapper), Arc::new(rules), spec.entity);
    let producer = tokio::spawn(
        async move {
            let mut batches = batches;
            while let Some(item) = batches.next().await {
                let prepared = match item {
                    Ok(batch) => {
                        let (m, r) = (mapper.clone(), rules.clone());
                        tokio::task::spawn_blocking(move || prepare_batch(&m, &r, entity, batch))
                            .await
                            .map_err(|e| {
                                PipelineError::new(
                                    PipelineErrorKind::Engine(ErrorKind::Input),
                                    format!("preparing a batch failed: {e}"),
                                )
                            })
                    }
                    Err(e) => Err(PipelineError::from(e)),
                };
                let stop = prepared.is_err();
                if tx.send(prepared).await.is_err() || stop {
                    break;
                }
            }
        }
        .in_current_span(),
    );
    let mut producer = AbortOnDrop(producer);

    let loaded = async {
        let mut totals = RowCounts::default();
        let mut number = 0u64;
        while let Some(prepared) = rx.recv().await {
            let batch = prepared?;
            number += 1;
            let span = tracing::info_span!(
                "batch",
                tenant = %tenant,
                pipeline = %spec.name,
                run_id = %run_id,
                batch = number,
                rows_read = tracing::field::Empty,
                quarantined = tracing::field::Empty,
            );
            let committed = warehouse
                .commit_batch(&scope, &batch, version)
                .instrument(span.clone())
                .await?;
            span.record("rows_read", committed.counts.rows_read);
            span.record("quarantined", committed.counts.quarantined);
            version = committed.version;
            totals.add(&committed.counts);
            tracing::debug!(rows_read = totals.rows_read, version, "batch committed");
            observer.batch_committed(&totals);
        }
        if stream.sync_mode == SyncMode::FullRefresh {
            // The whole input is loaded: the next run reads it afresh.
            warehouse.set_cursor(&scope, None, version).await?;
        }
        Ok::<_, PipelineError>(totals)
    }
    .await;
    // The producer's task holds the run's span: it ends before the run does, so the span
    // closes (and is exported) with the run, not whenever the runtime drops the task.
    producer.stop().await;
    loaded
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Stops the task and waits until it is gone.
    async fn stop(&mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
