//! Replaying quarantined rows: their raw values (as read, or as an admin fixed them) go
//! through the pipeline's map, validate and dedupe stages again as one run of their own
//! (trigger `replay`). A row that passes is loaded and marked `replayed` by the run; one
//! that fails again stays `pending` with its new errors. The run's ledger balances like
//! any other: rows_read = loaded + quarantined + deduplicated.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use serde_json::Value;
use sluice_connectors::SourceBatch;
use sluice_engine::quarantine::{QuarantineStatus, QuarantinedRow};
use sluice_engine::validate::RuleSet;
use sluice_engine::warehouse::{LoadStore, QuarantineStore, ReplaySettlement, RunScope};
use sluice_engine::{ErrorKind, RowCounts, TenantSlug};

use crate::error::{PipelineError, PipelineErrorKind};
use crate::map::Mapper;
use crate::runner::{RunOptions, RunReport, begin_run, end_run};
use crate::spec::PipelineSpec;
use crate::stages::prepare_batch;

/// The stream whose fence replay batches commit under (a replay has no source cursor).
pub const REPLAY_STREAM: &str = "quarantine-replay";

/// Replays `rows` (quarantined rows of `spec`'s pipeline, pending or fixed) as one run.
/// Rows of another pipeline, or already replayed or ignored, are refused.
pub async fn replay_quarantined<W: LoadStore + QuarantineStore>(
    spec: &PipelineSpec,
    warehouse: &W,
    rows: &[QuarantinedRow],
    options: &RunOptions,
) -> Result<RunReport, PipelineError> {
    check_replayable(spec, rows)?;
    let mut pages = vec![rows.to_vec()];
    replay_quarantined_pages(
        spec,
        warehouse,
        || std::future::ready(Ok(pages.pop().unwrap_or_default())),
        options,
    )
    .await
}

/// Replays quarantined rows page by page as one run: `next_page` gives the next page
/// (empty when there is no more), and each page is loaded and settled before the next is
/// asked for, so memory holds one page however many rows the replay has. A page should
/// not repeat rows an earlier page settled (page by id, after the last id seen).
pub async fn replay_quarantined_pages<W, F, Fut>(
    spec: &PipelineSpec,
    warehouse: &W,
    mut next_page: F,
    options: &RunOptions,
) -> Result<RunReport, PipelineError>
where
    W: LoadStore + QuarantineStore,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Vec<QuarantinedRow>, PipelineError>>,
{
    let started = Instant::now();
    let tenant = TenantSlug::parse(&spec.tenant)?;
    let rules = RuleSet::new(spec.entity, &spec.rules)?;
    let run_id = begin_run(spec, warehouse, &tenant, &rules, options).await?;
    let span =
        tracing::info_span!("replay", tenant = %tenant, pipeline = %spec.name, run_id = %run_id);
    tracing::Instrument::instrument(
        async {
            let outcome = async {
                let mut totals = RowCounts::default();
                loop {
                    let page = next_page().await?;
                    if page.is_empty() {
                        break;
                    }
                    check_replayable(spec, &page)?;
                    let counts =
                        replay_batches(spec, warehouse, &tenant, &run_id, &rules, &page).await?;
                    totals.add(&counts);
                }
                Ok(totals)
            }
            .await;
            end_run(warehouse, &tenant, &run_id, outcome, started).await
        },
        span,
    )
    .await
}

fn check_replayable(spec: &PipelineSpec, rows: &[QuarantinedRow]) -> Result<(), PipelineError> {
    if let Some(other) = rows.iter().find(|r| r.pipeline != spec.name) {
        return Err(PipelineError::config(format!(
            "quarantined row {} belongs to pipeline '{}', not '{}'",
            other.id, other.pipeline, spec.name
        )));
    }
    if let Some(done) = rows.iter().find(|r| {
        !matches!(
            r.status,
            QuarantineStatus::Pending | QuarantineStatus::Fixed
        )
    }) {
        return Err(PipelineError::config(format!(
            "quarantined row {} is {}: only pending or fixed rows are replayed",
            done.id,
            done.status.as_str()
        )));
    }
    Ok(())
}

/// The source columns a replay batch has: every raw key (in first-seen order), then the
/// columns the mapping reads that no row has (as empty cells).
fn replay_columns(spec: &PipelineSpec, rows: &[QuarantinedRow]) -> Vec<String> {
    let mut columns: Vec<String> = Vec::new();
    for r in rows {
        for k in r.raw.keys() {
            if !columns.iter().any(|c| c == k) {
                columns.push(k.clone());
            }
        }
    }
    for field in spec.entity.fields() {
        let source = spec
            .mapping
            .get(field.name)
            .map_or(field.name, String::as_str);
        if !columns.iter().any(|c| c.eq_ignore_ascii_case(source)) {
            columns.push(source.to_string());
        }
    }
    columns
}

fn cell(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

async fn replay_batches<W: LoadStore + QuarantineStore>(
    spec: &PipelineSpec,
    warehouse: &W,
    tenant: &TenantSlug,
    run_id: &str,
    rules: &RuleSet,
    rows: &[QuarantinedRow],
) -> Result<RowCounts, PipelineError> {
    let columns = replay_columns(spec, rows);
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let required: Vec<&str> = spec.rules.require.iter().map(String::as_str).collect();
    let mut mapper = Mapper::new(
        spec.entity,
        &spec.mapping,
        &required,
        &schema,
        spec.decimal_format()?,
        spec.time_format()?,
    )?;
    if let Some(column) = spec.soft_delete_column() {
        mapper = mapper.with_soft_delete(column, &schema)?;
    }
    let scope = RunScope {
        tenant: tenant.clone(),
        pipeline: spec.name.clone(),
        stream: REPLAY_STREAM.to_string(),
        run_id: run_id.to_string(),
        rules_hash: rules.hash(),
    };
    let mut version = warehouse
        .stream_state(tenant, &spec.name, REPLAY_STREAM)
        .await?
        .version;
    let mut totals = RowCounts::default();
    // A record rejected as a whole (a ragged line) has no trustworthy cells until an admin
    // fixes it: unfixed, it stays pending as it is.
    let (unfixed, rows): (Vec<&QuarantinedRow>, Vec<&QuarantinedRow>) =
        rows.iter().partition(|r| {
            r.status == QuarantineStatus::Pending && r.errors.iter().any(|e| e.field == "_record")
        });
    if !unfixed.is_empty() {
        let failed: Vec<_> = unfixed
            .iter()
            .map(|r| (r.id.clone(), r.errors.clone()))
            .collect();
        warehouse
            .settle_replay(tenant, run_id, &[], &failed)
            .await?;
        totals.rows_read += failed.len() as u64;
        totals.quarantined += failed.len() as u64;
    }
    for chunk in rows.chunks(spec.batch_rows().max(1)) {
        let arrays: Vec<ArrayRef> = columns
            .iter()
            .map(|c| {
                Arc::new(StringArray::from(
                    chunk.iter().map(|r| cell(r.raw.get(c))).collect::<Vec<_>>(),
                )) as ArrayRef
            })
            .collect();
        let records = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| {
            PipelineError::new(
                PipelineErrorKind::Engine(ErrorKind::Input),
                format!("building the replay batch: {e}"),
            )
        })?;
        let batch = SourceBatch {
            deletions: Vec::new(),
            records,
            positions: (0..chunk.len() as u64).collect(),
            rejects: Vec::new(),
            cursor: Value::Null,
            location: "quarantine".into(),
            sheet: None,
        };
        let mut load = prepare_batch(&mapper, rules, spec.entity, batch);
        let mut failed_rows = vec![false; chunk.len()];
        let failed: Vec<(String, Vec<sluice_engine::validate::CellError>)> =
            std::mem::take(&mut load.quarantine)
                .into_iter()
                .filter_map(|q| {
                    let i = usize::try_from(q.position.row).ok()?;
                    failed_rows[i] = true;
                    Some((chunk[i].id.clone(), q.errors))
                })
                .collect();
        let replayed: Vec<String> = chunk
            .iter()
            .zip(&failed_rows)
            .filter(|(_, f)| !**f)
            .map(|(r, _)| r.id.clone())
            .collect();
        load.rows_read -= failed.len() as u64;
        load.cursor = None;
        let (n_replayed, n_failed) = (replayed.len(), failed.len());
        // The rows and their quarantine entries' new state commit together.
        load.settles = Some(ReplaySettlement { replayed, failed });
        let committed = warehouse.commit_batch(&scope, &load, version).await?;
        version = committed.version;
        totals.add(&committed.counts);
        totals.rows_read += n_failed as u64;
        totals.quarantined += n_failed as u64;
        tracing::info!(
            replayed = n_replayed,
            failed = n_failed,
            "replay batch committed"
        );
    }
    Ok(totals)
}
