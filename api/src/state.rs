//! What every handler shares.

use std::sync::Arc;

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
    /// Largest JSON body accepted.
    pub body_limit: usize,
    /// Largest uploaded file accepted (default 100 MB).
    pub upload_limit: usize,
    /// Where uploaded files are kept: `<dir>/<tenant>/<pipeline>/<sha256>.<ext>`.
    pub upload_dir: std::path::PathBuf,
}

impl<W> AppState<W> {
    /// State with default limits (rate 100/s, burst 200; JSON bodies up to 1 MiB; uploads
    /// up to 100 MB, kept under `upload_dir`).
    pub fn new(warehouse: Arc<W>, queues: Arc<Queues>, upload_dir: std::path::PathBuf) -> Self {
        AppState {
            warehouse,
            queues,
            rate: RateLimit::default(),
            buckets: Buckets::default(),
            body_limit: 1 << 20,
            upload_limit: 100_000_000,
            upload_dir,
        }
    }
}
