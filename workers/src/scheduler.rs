//! The cron scheduler. It re-reads the pipelines' schedules from the control store every
//! `reload` (so a changed schedule applies without a restart) and, when a pipeline's tick
//! comes, triggers a sync with the idempotency key `cron:<pipeline>:<tick>`: any number of
//! scheduler replicas fire each tick once. The last fired tick of every pipeline is kept
//! with the coordinator; ticks missed while no scheduler ran are skipped, or made up by a
//! single run on start ([`CatchUp`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Timelike, Utc};
use futures_util::StreamExt;
use sluice_engine::control::{PipelineStore, ScheduledPipeline};

use crate::error::WorkerError;
use crate::metrics::metrics;
use crate::queue::{IdempotencyKey, Queues, TriggerRequest, Triggered};
use sluice_engine::RunTrigger;

/// What to do about ticks missed while no scheduler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Forget them; wait for the next tick.
    Skip,
    /// Run once for the latest missed tick.
    One,
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Missed ticks on start.
    pub catch_up: CatchUp,
    /// How often schedules are re-read.
    pub reload: Duration,
    /// Triggers sent at once when many pipelines share a tick.
    pub parallel_triggers: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            catch_up: CatchUp::One,
            reload: Duration::from_secs(1),
            parallel_triggers: 64,
        }
    }
}

struct Entry {
    cron_text: String,
    cron: Option<croner::Cron>,
    /// The last tick fired or deliberately passed over (Unix ms).
    last: i64,
}

/// A tick to fire.
#[derive(Debug, Clone)]
pub struct Due {
    /// The pipeline.
    pub pipeline: ScheduledPipeline,
    /// Its tick.
    pub tick: DateTime<Utc>,
}

/// The scheduler's state between passes.
pub struct Scheduler<S> {
    store: Arc<S>,
    queues: Arc<Queues>,
    options: SchedulerOptions,
    known: HashMap<(String, String), Entry>,
}

fn parse(cron: &str) -> Option<croner::Cron> {
    let spec = sluice_pipelines::spec::ScheduleSpec {
        cron: cron.to_string(),
    };
    match spec.parse() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "schedule ignored");
            None
        }
    }
}

impl<S: PipelineStore> Scheduler<S> {
    /// A scheduler over `store`'s pipelines, enqueueing into `queues`.
    pub fn new(store: Arc<S>, queues: Arc<Queues>, options: SchedulerOptions) -> Self {
        Scheduler {
            store,
            queues,
            options,
            known: HashMap::new(),
        }
    }

    /// Runs until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        tracing::info!(catch_up = ?self.options.catch_up, "scheduler started");
        loop {
            let wait = match self.pass(Utc::now()).await {
                Ok((fired, next)) => {
                    if fired > 0 {
                        tracing::debug!(fired, "scheduler pass");
                    }
                    next.map_or(self.options.reload, |n| {
                        (n - Utc::now())
                            .to_std()
                            .unwrap_or_default()
                            .min(self.options.reload)
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler pass failed; retrying");
                    self.options.reload
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(wait + Duration::from_millis(5)) => {}
            }
        }
        tracing::info!("scheduler stopped");
    }

    /// One pass at `now`: re-reads schedules, fires what is due. Returns how many ticks
    /// fired and when the next one comes.
    pub async fn pass(
        &mut self,
        now: DateTime<Utc>,
    ) -> Result<(usize, Option<DateTime<Utc>>), WorkerError> {
        let due = self.due(now).await?;
        let fired = due.len();
        let queues = self.queues.clone();
        let results: Vec<(Due, Result<Triggered, WorkerError>)> = futures_util::stream::iter(due)
            .map(|d| {
                let queues = queues.clone();
                async move {
                    let r = fire(&queues, &d).await;
                    (d, r)
                }
            })
            .buffer_unordered(self.options.parallel_triggers.max(1))
            .collect()
            .await;
        for (d, r) in results {
            let key = (d.pipeline.tenant.clone(), d.pipeline.name.clone());
            match r {
                Ok(t) => {
                    metrics().scheduler_ticks.inc();
                    tracing::info!(tenant = %d.pipeline.tenant, pipeline = %d.pipeline.name, tick = %d.tick, run_id = %t.run_id, outcome = ?t.outcome, "tick fired");
                }
                Err(e) => {
                    // Not marked fired: the next pass tries this tick again.
                    if let Some(entry) = self.known.get_mut(&key) {
                        entry.last = entry.last.min(d.tick.timestamp_millis() - 1);
                    }
                    tracing::warn!(tenant = %d.pipeline.tenant, pipeline = %d.pipeline.name, error = %e, "tick not fired; will retry");
                }
            }
        }
        let next = self
            .known
            .values()
            .filter_map(|e| e.cron.as_ref())
            .filter_map(|c| c.find_next_occurrence(&now, false).ok())
            .min();
        Ok((fired, next))
    }

    /// The ticks due at `now`, marking them fired in memory.
    async fn due(&mut self, now: DateTime<Utc>) -> Result<Vec<Due>, WorkerError> {
        let pipelines = self.store.scheduled_pipelines().await.map_err(|e| {
            WorkerError::new(
                crate::error::WorkerErrorKind::Queue,
                format!("reading schedules: {e}"),
            )
        })?;
        let coord = self.queues.coordinator().clone();
        let mut due = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in pipelines {
            let key = (p.tenant.clone(), p.name.clone());
            seen.insert(key.clone());
            if !self.known.contains_key(&key) {
                let stored = coord.last_tick(&p.tenant, &p.name).await?;
                let last = match (stored, self.options.catch_up) {
                    (Some(t), CatchUp::One) => t,
                    _ => now.timestamp_millis(),
                };
                if stored.is_none() {
                    coord
                        .advance_tick(&p.tenant, &p.name, now.timestamp_millis())
                        .await?;
                }
                self.known.insert(
                    key.clone(),
                    Entry {
                        cron_text: p.cron.clone(),
                        cron: parse(&p.cron),
                        last,
                    },
                );
            }
            let Some(entry) = self.known.get_mut(&key) else {
                continue;
            };
            if entry.cron_text != p.cron {
                tracing::info!(tenant = %p.tenant, pipeline = %p.name, from = %entry.cron_text, to = %p.cron, "schedule changed");
                entry.cron_text = p.cron.clone();
                entry.cron = parse(&p.cron);
            }
            let Some(cron) = &entry.cron else { continue };
            let Ok(tick) = cron.find_previous_occurrence(&now, true) else {
                continue;
            };
            // croner keeps `now`'s fraction of a second: without this, replicas passing at
            // different instants of the same second named one tick differently, and each
            // fired it under its own idempotency key.
            let Some(tick) = tick.with_nanosecond(0) else {
                continue;
            };
            if tick.timestamp_millis() > entry.last {
                entry.last = tick.timestamp_millis();
                due.push(Due { pipeline: p, tick });
            }
        }
        self.known.retain(|k, _| seen.contains(k));
        Ok(due)
    }
}

/// Triggers the sync of one due tick and records the tick as fired.
async fn fire(queues: &Queues, due: &Due) -> Result<Triggered, WorkerError> {
    let p = &due.pipeline;
    let at = due.tick.timestamp_millis();
    let triggered = queues
        .trigger(&TriggerRequest {
            tenant: p.tenant.clone(),
            pipeline: p.name.clone(),
            trigger: RunTrigger::Cron,
            idempotency_key: Some(IdempotencyKey::CronTick(at)),
            correlation_id: None,
            file: None,
        })
        .await?;
    queues
        .coordinator()
        .advance_tick(&p.tenant, &p.name, at)
        .await?;
    Ok(triggered)
}

/// `ms` as an instant (for logs and tests).
pub fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}
