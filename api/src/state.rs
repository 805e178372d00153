//! What every handler shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_pipelines::Confinement;
use sluice_workers::Queues;

use crate::rate_limit::{Buckets, RateLimit};

/// The API's state.
pub struct AppState<W> {
    /// Rows, runs, quarantine, pipelines, keys, audit.
    pub warehouse: Arc<W>,
    /// Where syncs and replays are queued.
    pub queues: Arc<Queues>,
    /// Per-key request rate.
    pub rate: RateLimit,
    /// Per-key token buckets.
    pub buckets: Buckets,
    /// Failed authentications per client address.
    pub auth_failures: Buckets,
    /// Largest JSON body accepted.
    pub body_limit: usize,
    /// Largest uploaded file accepted (default 100 MB).
    pub upload_limit: usize,
    /// Bytes of uploaded files a tenant may keep (default 10 GB).
    pub upload_quota: u64,
    /// Where uploaded files are kept: `<dir>/<tenant>/<pipeline>/<sha256>.<ext>`.
    pub upload_dir: std::path::PathBuf,
    /// What pipelines defined through the API may reach (files, hosts).
    pub confinement: Confinement,
    /// Recent source checks.
    pub health: HealthCache,
    /// Anomaly lists computed for a tenant's current data, paged from here.
    pub anomalies: ComputedLists<sluice_finance::Anomaly>,
    /// Quarantine counts per tenant, computed once for every caller waiting at a moment.
    pub quarantine_stats: Coalesced<sluice_engine::quarantine::QuarantineStats>,
}

/// A pipeline's identity in the health cache: tenant, name, and when it was last saved (a
/// changed definition is checked afresh).
pub type HealthKey = (String, String, chrono::DateTime<chrono::Utc>);

/// A source check's answer: its detail and latency in ms, or what went wrong.
pub type HealthAnswer = Result<(String, u64), String>;

/// Source checks answered in the last few seconds, by pipeline.
#[derive(Default)]
pub struct HealthCache(Mutex<HashMap<HealthKey, (Instant, HealthAnswer)>>);

impl HealthCache {
    /// The answer for `key` if it is younger than `ttl`.
    pub fn get(&self, key: &HealthKey, ttl: Duration) -> Option<HealthAnswer> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, answer)| answer.clone())
    }

    /// Keeps `answer` for `key`, dropping answers older than a minute.
    pub fn put(&self, key: HealthKey, answer: HealthAnswer) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(60));
        map.insert(key, (Instant::now(), answer));
    }
}

impl<W> AppState<W> {
    /// State with default limits (rate 100/s, burst 200; JSON bodies up to 1 MiB; uploads
    /// up to 100 MB); pipelines confined by `confinement`, whose upload directory keeps the
    /// uploads.
    pub fn new(warehouse: Arc<W>, queues: Arc<Queues>, confinement: Confinement) -> Self {
        AppState {
            warehouse,
            queues,
            rate: RateLimit::default(),
            buckets: Buckets::default(),
            auth_failures: Buckets::default(),
            body_limit: 1 << 20,
            upload_limit: 100_000_000,
            upload_quota: 10_000_000_000,
            upload_dir: confinement.upload_dir().to_path_buf(),
            confinement,
            health: HealthCache::default(),
            anomalies: ComputedLists::default(),
            quarantine_stats: Coalesced::default(),
        }
    }
}

/// Lists that are costly to compute (every anomaly of a tenant) kept with the version of
/// the data they were computed from, so that each page of a list is a slice of one
/// computation instead of a computation of its own. A new version (a run that changed
/// the data) computes afresh. At most [`ComputedLists::KEPT`] lists are kept.
pub struct ComputedLists<T>(Mutex<HashMap<String, ComputedList<T>>>);

/// Answers costly to compute that many callers ask for at once: each caller gets an answer
/// computed after it asked (never an older one), but callers who arrive while one
/// computation runs share the next one, so a burst of N callers costs at most two
/// computations instead of N.
pub struct Coalesced<T>(Mutex<HashMap<String, Arc<CoalescedSlot<T>>>>);

/// One key's callers: tickets in order of arrival, and the last answer with the last
/// ticket issued before its computation started.
pub struct CoalescedSlot<T> {
    tickets: std::sync::atomic::AtomicU64,
    last: tokio::sync::Mutex<Option<(u64, T)>>,
}

impl<T> Default for Coalesced<T> {
    fn default() -> Self {
        Coalesced(Mutex::new(HashMap::new()))
    }
}

impl<T: Clone> Coalesced<T> {
    /// The answer for `key`, from a computation that started after this call.
    pub async fn get<E, F, Fut>(&self, key: &str, compute: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        use std::sync::atomic::Ordering;
        let slot = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= 10_000 {
                map.retain(|_, slot| Arc::strong_count(slot) > 1);
            }
            map.entry(key.to_string())
                .or_insert_with(|| {
                    Arc::new(CoalescedSlot {
                        tickets: 0.into(),
                        last: tokio::sync::Mutex::new(None),
                    })
                })
                .clone()
        };
        let ticket = slot.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        // One computation at a time per key; waiters queue in order.
        let mut last = slot.last.lock().await;
        if let Some((covers, answer)) = &*last
            && *covers >= ticket
        {
            return Ok(answer.clone());
        }
        let covers = slot.tickets.load(Ordering::SeqCst);
        let answer = compute().await?;
        *last = Some((covers, answer.clone()));
        Ok(answer)
    }
}

/// A list with the data version it was computed from and when.
type ComputedList<T> = (String, Instant, Arc<Vec<T>>);

impl<T> Default for ComputedLists<T> {
    fn default() -> Self {
        ComputedLists(Mutex::new(HashMap::new()))
    }
}

impl<T> ComputedLists<T> {
    /// Lists kept at once (the least recently computed goes first).
    pub const KEPT: usize = 64;

    /// The list under `key` computed at `version`, computing it with `compute` when there is
    /// none for that version.
    pub async fn get_or_compute<E, F, Fut>(
        &self,
        key: &str,
        version: &str,
        compute: F,
    ) -> Result<Arc<Vec<T>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, E>>,
    {
        if let Some((v, _, list)) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(key)
            && v == version
        {
            return Ok(list.clone());
        }
        let list = Arc::new(compute().await?);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::KEPT
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, at, _))| *at)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            key.to_string(),
            (version.to_string(), Instant::now(), list.clone()),
        );
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_burst_of_callers_shares_at_most_two_computations_each_fresh() {
        let stats = Arc::new(Coalesced::<u64>::default());
        let data = Arc::new(AtomicU64::new(1));
        let computed = Arc::new(AtomicUsize::new(0));
        let compute = {
            let (data, computed) = (data.clone(), computed.clone());
            move || {
                let (data, computed) = (data.clone(), computed.clone());
                async move {
                    computed.fetch_add(1, Ordering::SeqCst);
                    let seen = data.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, ()>(seen)
                }
            }
        };
        // A computation is under way when the data changes and a second caller comes.
        let first = tokio::spawn({
            let (stats, compute) = (stats.clone(), compute.clone());
            async move { stats.get("acme", compute).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        data.store(2, Ordering::SeqCst);
        let burst: Vec<_> = (0..50)
            .map(|_| {
                let (stats, compute) = (stats.clone(), compute.clone());
                tokio::spawn(async move { stats.get("acme", compute).await })
            })
            .collect();
        assert_eq!(first.await.expect("join"), Ok(1));
        for b in burst {
            assert_eq!(
                b.await.expect("join"),
                Ok(2),
                "a caller never gets an answer computed before it asked"
            );
        }
        assert_eq!(
            computed.load(Ordering::SeqCst),
            2,
            "51 callers, two computations"
        );
        // Later, alone: computed again.
        assert_eq!(stats.get("acme", compute.clone()).await, Ok(2));
        assert_eq!(computed.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_list_is_computed_once_per_version_of_the_data() {
        let lists = ComputedLists::<u32>::default();
        let computed = std::sync::atomic::AtomicUsize::new(0);
        let compute = || async {
            computed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, ()>(vec![1, 2, 3])
        };
        for _ in 0..3 {
            let list = lists
                .get_or_compute("acme", "run-1", compute)
                .await
                .expect("list");
            assert_eq!(*list, [1, 2, 3]);
        }
        assert_eq!(computed.load(std::sync::atomic::Ordering::SeqCst), 1);
        lists
            .get_or_compute("acme", "run-2", compute)
            .await
            .expect("list");
        lists
            .get_or_compute("globex", "run-2", compute)
            .await
            .expect("list");
        assert_eq!(computed.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
