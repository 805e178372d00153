//! Prometheus metrics: one registry for the whole program (workers, scheduler, runs; the API
//! adds its own to the same registry), rendered in the text exposition format.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use sluice_engine::{RowCounts, RunStatus};

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
    /// Runs that ended, by status.
    pub runs: IntCounterVec,
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
        Ok(Metrics {
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
            registry,
        })
    }

    /// Adds a finished run's rows and status.
    pub fn record_run(&self, status: RunStatus, counts: &RowCounts) {
        self.runs.with_label_values(&[status.as_str()]).inc();
        for (outcome, n) in [
            ("read", counts.rows_read),
            ("inserted", counts.inserted),
            ("updated", counts.updated),
            ("unchanged", counts.unchanged),
            ("quarantined", counts.quarantined),
            ("deduplicated", counts.deduplicated),
        ] {
            self.rows.with_label_values(&[outcome]).inc_by(n);
        }
    }
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
