//! Backups of the embedded warehouse: taken while a sync is part-way, restored into a new
//! data directory, the restored tenant holds exactly the batches its copy of the ledger
//! says were committed, and a sync there finishes with every row once. A restore checks
//! every file first and never replaces data it was not told to.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sluice_connectors::{BatchStream, HealthReport, ReadRequest, Source, SourceError, StreamInfo};
use sluice_engine::warehouse::FinanceStore;
use sluice_engine::warehouse::{RunHistory, backup_data_dir, restore_data_dir, verify_backup};
use sluice_engine::{RunStatus, SqliteWarehouse};
use sluice_pipelines::{PipelineSource, Quiet, RunOptions, SourceReach, run_pipeline};
use support::jobs::{assert_loaded_exactly, slug, write_pipeline};
use support::messy_invoices;
use tokio::sync::{Notify, Semaphore};

/// A source that stops before its batch `after` until `resume` gets a permit.
struct Paused {
    inner: PipelineSource,
    after: usize,
    reached: Arc<Notify>,
    resume: Arc<Semaphore>,
}

impl Source for Paused {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        self.inner.streams().await
    }
    async fn check(&self) -> Result<HealthReport, SourceError> {
        self.inner.check().await
    }
    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        let inner = self.inner.read(request).await?;
        let (after, reached, resume) = (self.after, self.reached.clone(), self.resume.clone());
        Ok(Box::pin(inner.enumerate().then(move |(i, batch)| {
            let (reached, resume) = (reached.clone(), resume.clone());
            async move {
                if i == after {
                    reached.notify_one();
                    resume.acquire().await.expect("permit").forget();
                }
                batch
            }
        })))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_mid_sync_restores_a_tenant_that_resumes_and_loads_every_row_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let (csv, exp) = messy_invoices(20_000, 41);
    let spec = write_pipeline(dir.path(), "invoices", &csv, 500, None);
    let plain = || {
        PipelineSource::from_spec(&spec.source, None, &SourceReach::unrestricted()).expect("src")
    };
    let (reached, resume) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
    let paused = Paused {
        inner: plain(),
        after: 12,
        reached: reached.clone(),
        resume: resume.clone(),
    };
    let w = SqliteWarehouse::new(&data);
    let sync = {
        let spec = spec.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let w = SqliteWarehouse::new(&data);
            run_pipeline(&spec, &paused, &w, &RunOptions::default(), &Quiet)
                .await
                .map(|r| r.ledger.counts)
        })
    };
    reached.notified().await;
    // The batches before the pause are committed (the load commits a batch before it
    // asks for the next), or about to be: wait for the ledger to show some.
    let acme = slug("acme");
    let mut committed = 0;
    for _ in 0..100 {
        if let Some(run) = w.runs(&acme, None, 1).await.expect("runs").first() {
            committed = run.counts.rows_read;
            if committed > 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(committed > 0, "no batch committed before the pause");

    let backup = dir.path().join("backup");
    let manifest = backup_data_dir(&data, &backup).await.expect("backup");
    assert!(
        manifest
            .files
            .iter()
            .any(|f| f.path == "tenants/acme.sqlite"),
        "{manifest:?}"
    );
    resume.add_permits(1);
    let counts = sync.await.expect("join").expect("the sync finishes");
    assert_eq!(counts.rows_read, exp.rows_read);
    assert_loaded_exactly(&w, &exp).await;

    // The copy holds the run as it was at the pause: running, its committed batches
    // balanced, and exactly the rows they inserted.
    let restored_dir = dir.path().join("restored");
    restore_data_dir(&backup, &restored_dir, false)
        .await
        .expect("restore");
    let restored = SqliteWarehouse::new(&restored_dir);
    let runs = restored.runs(&acme, None, 10).await.expect("runs");
    assert_eq!(runs.len(), 1, "{runs:?}");
    let copy = &runs[0];
    assert_eq!(copy.status, RunStatus::Running, "taken mid-run: {copy:?}");
    assert!(
        copy.counts.rows_read > 0 && copy.counts.rows_read < exp.rows_read,
        "{copy:?}"
    );
    assert_eq!(
        copy.counts.rows_read,
        copy.counts.loaded() + copy.counts.quarantined + copy.counts.deduplicated
    );
    let rows = restored.invoices(&acme).await.expect("invoices").len() as u64;
    assert_eq!(rows, copy.counts.inserted, "{copy:?}");

    // A sync on the restored directory resumes after the copy's last batch and ends with
    // every row once.
    let again = run_pipeline(&spec, &plain(), &restored, &RunOptions::default(), &Quiet)
        .await
        .expect("the resumed sync");
    assert_eq!(
        copy.counts.rows_read + again.ledger.counts.rows_read,
        exp.rows_read,
        "resumed after the copy's batches: {:?}",
        again.ledger.counts
    );
    assert_loaded_exactly(&restored, &exp).await;
}

#[tokio::test]
async fn a_restore_checks_every_file_and_replaces_data_only_when_told() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let (csv, exp) = messy_invoices(2_000, 43);
    write_pipeline(dir.path(), "invoices", &csv, 500, None);
    let sluice = |data: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--data-dir")
            .arg(data)
            .env_remove("SLUICE_DATABASE_URL")
            .env_remove("SLUICE_REDIS_URL")
            .args(args)
            .output()
            .expect("sluice")
    };
    let file = dir.path().join("invoices.toml");
    let out = sluice(&data, &["sync", file.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backup = dir.path().join("backup");
    let out = sluice(&data, &["backup", backup.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tenants/acme.sqlite"));
    // A backup never goes over another.
    let again = sluice(&data, &["backup", backup.to_str().expect("path")]);
    assert!(!again.status.success());

    // Into a directory holding data: refused without --force, done with it.
    let refused = sluice(&data, &["restore", backup.to_str().expect("path")]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    let out = sluice(
        &data,
        &["restore", backup.to_str().expect("path"), "--force"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_loaded_exactly(&SqliteWarehouse::new(&data), &exp).await;

    // An altered file is found before anything is replaced.
    let tenant_copy = backup.join("tenants/acme.sqlite");
    let mut bytes = std::fs::read(&tenant_copy).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&tenant_copy, bytes).expect("write");
    assert!(verify_backup(&backup).is_err());
    let fresh = dir.path().join("fresh");
    let out = sluice(&fresh, &["restore", backup.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match its manifest"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!fresh.join("tenants/acme.sqlite").exists());
}
