//! Prometheus metrics: one registry for the whole program (workers, scheduler, runs; the API
//! adds its own to the same registry), rendered in the text exposition format.

use std::sync::OnceLock;

use std::collections::BTreeSet;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use sluice_engine::control::PipelineStore;
use sluice_engine::warehouse::{QuarantineStore, RunHistory};
use sluice_engine::{RowCounts, RunStatus};

use crate::queue::QueueName;

/// Where the rows of a finished run went, as `rows_total` labels them.
const OUTCOMES: [&str; 6] = [
    "read",
    "inserted",
    "updated",
    "unchanged",
    "quarantined",
    "deduplicated",
];

/// Every metric the workers and the scheduler keep.
pub struct Metrics {
    /// The program's one registry.
    pub registry: Registry,
    /// Jobs taken from a queue, by queue.
    pub jobs_started: IntCounterVec,
    /// Jobs that ended with a successful run, by queue.
    pub jobs_succeeded: IntCounterVec,
    /// Failed attempts (each retried or, at the end, dead), by queue.
    pub jobs_failed: IntCounterVec,
    /// Jobs that became dead letters, by queue.
    pub jobs_dead: IntCounterVec,
    /// Time from taking a job to its end, by queue.
    pub job_duration: HistogramVec,
    /// Jobs waiting in a queue (sampled), by queue.
    pub queue_depth: IntGaugeVec,
    /// Jobs being worked on in this process, by queue.
    pub in_flight: IntGaugeVec,
    /// Dead letters recorded by this process.
    pub dead_letters: IntCounter,
    /// Triggers or jobs that found a pipeline's lock taken.
    pub lock_contention: IntCounter,
    /// Scheduler ticks that enqueued a sync (or found it enqueued by another scheduler).
    pub scheduler_ticks: IntCounter,
    /// Rows of finished runs, by where they went (read, inserted, updated, unchanged,
    /// quarantined, deduplicated).
    pub rows: IntCounterVec,
    /// Runs that ended, by status (`failed`: the job became a dead letter).
    pub runs: IntCounterVec,
    /// When each pipeline last synced successfully (Unix seconds; when it was saved, if it
    /// never has), by tenant and pipeline. Sampled from the warehouse by `sluice serve`.
    pub pipeline_last_success: IntGaugeVec,
    /// The gap between a scheduled pipeline's next two cron ticks, in seconds.
    pub pipeline_schedule_interval: IntGaugeVec,
    /// Quarantined rows still open (pending or fixed), by tenant and the rule they broke.
    pub quarantine_pending: IntGaugeVec,
    /// Webhook delivery attempts by outcome: `delivered` (2xx), `refused` (another
    /// status), `unreachable` (no answer).
    pub webhook_attempts: IntCounterVec,
    /// Webhook deliveries that used up every attempt.
    pub webhook_deliveries_failed: IntCounter,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The program's metrics (registered on first use).
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new().unwrap_or_else(|e| panic!("metric definitions: {e}")))
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("sluice".into()), None)?;
        let by_queue = ["queue"];
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &by_queue)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), &by_queue)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let plain = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let job_duration = HistogramVec::new(
            HistogramOpts::new("job_duration_seconds", "Time from taking a job to its end")
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
                ]),
            &by_queue,
        )?;
        registry.register(Box::new(job_duration.clone()))?;
        let rows = IntCounterVec::new(
            Opts::new("rows_total", "Rows of finished runs by where they went"),
            &["outcome"],
        )?;
        registry.register(Box::new(rows.clone()))?;
        let runs =
            IntCounterVec::new(Opts::new("runs_total", "Runs by final status"), &["status"])?;
        registry.register(Box::new(runs.clone()))?;
        let labelled =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let pipeline_last_success = labelled(
            "pipeline_last_success_timestamp_seconds",
            "When each pipeline last synced successfully (when it was saved, if never)",
            &["tenant", "pipeline"],
        )?;
        let pipeline_schedule_interval = labelled(
            "pipeline_schedule_interval_seconds",
            "The gap between a scheduled pipeline's next two cron ticks",
            &["tenant", "pipeline"],
        )?;
        let quarantine_pending = labelled(
            "quarantine_pending_rows",
            "Quarantined rows still open (pending or fixed), by the rule they broke",
            &["tenant", "rule"],
        )?;
        let webhook_attempts = IntCounterVec::new(
            Opts::new(
                "webhook_attempts_total",
                "Webhook delivery attempts by outcome",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(webhook_attempts.clone()))?;
        let m = Metrics {
            jobs_started: counter("jobs_started_total", "Jobs taken from a queue")?,
            jobs_succeeded: counter(
                "jobs_succeeded_total",
                "Jobs that ended with a successful run",
            )?,
            jobs_failed: counter("jobs_failed_total", "Failed job attempts")?,
            jobs_dead: counter("jobs_dead_total", "Jobs that became dead letters")?,
            queue_depth: gauge("queue_depth", "Jobs waiting in a queue")?,
            in_flight: gauge("jobs_in_flight", "Jobs being worked on in this process")?,
            dead_letters: plain("dead_letters_total", "Dead letters recorded")?,
            lock_contention: plain(
                "lock_contention_total",
                "Triggers or jobs that found a pipeline's lock taken",
            )?,
            scheduler_ticks: plain("scheduler_ticks_total", "Scheduler ticks fired")?,
            job_duration,
            rows,
            runs,
            pipeline_last_success,
            pipeline_schedule_interval,
            quarantine_pending,
            webhook_attempts,
            webhook_deliveries_failed: plain(
                "webhook_deliveries_failed_total",
                "Webhook deliveries that used up every attempt",
            )?,
            registry,
        };
        // Every series a dashboard or an alert rate()s exists from the start, at zero.
        for q in [QueueName::Sync, QueueName::Replay, QueueName::Webhook] {
            let q = [q.as_str()];
            for c in [
                &m.jobs_started,
                &m.jobs_succeeded,
                &m.jobs_failed,
                &m.jobs_dead,
            ] {
                c.with_label_values(&q);
            }
            m.queue_depth.with_label_values(&q);
            m.in_flight.with_label_values(&q);
            m.job_duration.with_label_values(&q);
        }
        for outcome in ["delivered", "refused", "unreachable"] {
            m.webhook_attempts.with_label_values(&[outcome]);
        }
        for outcome in OUTCOMES {
            m.rows.with_label_values(&[outcome]);
        }
        for status in [RunStatus::Succeeded, RunStatus::Failed] {
            m.runs.with_label_values(&[status.as_str()]);
        }
        Ok(m)
    }

    /// Adds a finished run's rows and status.
    pub fn record_run(&self, status: RunStatus, counts: &RowCounts) {
        self.runs.with_label_values(&[status.as_str()]).inc();
        let n = [
            counts.rows_read,
            counts.inserted,
            counts.updated,
            counts.unchanged,
            counts.quarantined,
            counts.deduplicated,
        ];
        for (outcome, n) in OUTCOMES.into_iter().zip(n) {
            self.rows.with_label_values(&[outcome]).inc_by(n);
        }
    }

    /// Counts a job that became a dead letter as a failed run.
    pub fn record_dead_run(&self) {
        self.runs
            .with_label_values(&[RunStatus::Failed.as_str()])
            .inc();
    }
}

/// Samples what only the warehouse knows into the metrics, every `every`: each pipeline's
/// last success and schedule, and the open quarantine by rule. Run by `sluice serve`; a
/// tenant whose reads fail keeps its last figures and is logged.
pub async fn sample_warehouse<W>(warehouse: std::sync::Arc<W>, every: Duration)
where
    W: RunHistory + PipelineStore + QuarantineStore + 'static,
{
    let m = metrics();
    let mut shown: BTreeSet<(String, String)> = BTreeSet::new();
    let mut shown_rules: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        match sample_once(&*warehouse).await {
            Ok(sample) => {
                let now: BTreeSet<_> = sample.pipelines.iter().map(|p| p.0.clone()).collect();
                for gone in shown.difference(&now) {
                    let labels = [gone.0.as_str(), gone.1.as_str()];
                    let _ = m.pipeline_last_success.remove_label_values(&labels);
                    let _ = m.pipeline_schedule_interval.remove_label_values(&labels);
                }
                for ((tenant, pipeline), last, interval) in &sample.pipelines {
                    let labels = [tenant.as_str(), pipeline.as_str()];
                    m.pipeline_last_success
                        .with_label_values(&labels)
                        .set(*last);
                    match interval {
                        Some(s) => m
                            .pipeline_schedule_interval
                            .with_label_values(&labels)
                            .set(*s),
                        None => {
                            let _ = m.pipeline_schedule_interval.remove_label_values(&labels);
                        }
                    }
                }
                shown = now;
                let rules: BTreeSet<_> = sample.pending.iter().map(|r| r.0.clone()).collect();
                for gone in shown_rules.difference(&rules) {
                    let _ = m
                        .quarantine_pending
                        .remove_label_values(&[gone.0.as_str(), gone.1.as_str()]);
                }
                for ((tenant, rule), n) in &sample.pending {
                    m.quarantine_pending
                        .with_label_values(&[tenant.as_str(), rule.as_str()])
                        .set(*n);
                }
                shown_rules = rules;
            }
            Err(e) => tracing::warn!(error = %e, "sampling the warehouse for metrics"),
        }
        tokio::time::sleep(every).await;
    }
}

/// One reading of the warehouse for [`sample_warehouse`].
struct Sample {
    /// (tenant, pipeline), last success (Unix seconds), schedule interval (seconds).
    pipelines: Vec<((String, String), i64, Option<i64>)>,
    /// (tenant, rule), open rows.
    pending: Vec<((String, String), i64)>,
}

async fn sample_once<W>(w: &W) -> sluice_engine::Result<Sample>
where
    W: RunHistory + PipelineStore + QuarantineStore,
{
    let now = chrono::Utc::now();
    let mut sample = Sample {
        pipelines: Vec::new(),
        pending: Vec::new(),
    };
    for tenant in w.tenants().await? {
        for p in w.pipelines(&tenant).await? {
            let runs = w.runs(&tenant, Some(&p.name), 50).await?;
            let last = runs
                .iter()
                .find(|r| r.status == RunStatus::Succeeded)
                .and_then(|r| r.finished_at)
                .unwrap_or(p.updated_at);
            let interval =
                sluice_pipelines::spec::ScheduleSpec::of_stored(&p.spec).and_then(|cron| {
                    let first = cron.find_next_occurrence(&now, false).ok()?;
                    let second = cron.find_next_occurrence(&first, false).ok()?;
                    Some((second - first).num_seconds())
                });
            sample.pipelines.push((
                (tenant.to_string(), p.name.clone()),
                last.timestamp(),
                interval,
            ));
        }
        let stats = w.quarantine_stats(&tenant).await?;
        for (rule, n) in stats.open_by_rule {
            sample.pending.push((
                (tenant.to_string(), rule),
                i64::try_from(n).unwrap_or(i64::MAX),
            ));
        }
    }
    Ok(sample)
}

/// Every metric in Prometheus' text format.
pub fn render() -> String {
    let mut out = Vec::new();
    let families = metrics().registry.gather();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}
