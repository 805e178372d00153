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
        }
    }
}

/// Lists that are costly to compute (every anomaly of a tenant) kept with the version of
/// the data they were computed from, so that each page of a list is a slice of one
/// computation instead of a computation of its own. A new version (a run that changed
/// the data) computes afresh. At most [`ComputedLists::KEPT`] lists are kept.
pub struct ComputedLists<T>(Mutex<HashMap<String, ComputedList<T>>>);

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
