//! Backups of the embedded warehouse's data directory while it is in use: each SQLite file
//! (the control store, the embedded queue, every tenant's warehouse) is copied with
//! `VACUUM INTO`, which reads one consistent snapshot of it inside a read transaction
//! while syncs keep writing; uploaded files are copied as they are (they never change once
//! stored). A manifest lists every file with its size and SHA-256; a restore checks them
//! all before it replaces anything.
//!
//! Each file is consistent on its own, which is what a tenant needs: its rows, its
//! quarantine, its run ledger and its stream cursors live in one file and are snapshotted
//! together, so a restored tenant resumes from the batches its copy holds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Executor};

use crate::error::{EngineError, ErrorKind, Result};

const MANIFEST: &str = "sluice-backup.json";

/// What a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupManifest {
    /// When the backup was taken (RFC 3339).
    pub created_at: String,
    /// The sluice version that took it.
    pub version: String,
    /// Every file, relative to the data directory.
    pub files: Vec<BackupFile>,
}

/// One file of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupFile {
    /// Its path relative to the data directory (`/`-separated).
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Whether it is a SQLite database (snapshotted with `VACUUM INTO`).
    pub database: bool,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> EngineError {
    move |e| EngineError::new(ErrorKind::Config, context).with_source(e)
}

/// The data directory's files worth keeping, relative to it: SQLite databases (not their
/// `-wal`/`-shm` companions, which a snapshot folds in) and uploads.
fn files_of(data_dir: &Path) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = data_dir.join(&rel);
        let entries =
            std::fs::read_dir(&dir).map_err(io(format!("cannot list {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io(format!("cannot list {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = rel.join(&name);
            let kind = entry
                .file_type()
                .map_err(io(format!("cannot read {}", entry.path().display())))?;
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() {
                let database = name.ends_with(".sqlite");
                let upload = path.starts_with("uploads");
                if database || upload {
                    out.push((path.to_string_lossy().replace('\\', "/"), database));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sha256_of(path: &Path) -> Result<(u64, String)> {
    let mut file =
        std::fs::File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher)
        .map_err(io(format!("cannot read {}", path.display())))?;
    Ok((bytes, format!("{:x}", hasher.finalize())))
}

/// Copies the data directory `data_dir` into `dest` (which must not exist, or be empty)
/// while processes may be using it, and writes the manifest last.
pub async fn backup_data_dir(data_dir: &Path, dest: &Path) -> Result<BackupManifest> {
    if !data_dir.join("control.sqlite").exists() && !data_dir.join("tenants").exists() {
        return Err(EngineError::new(
            ErrorKind::Config,
            format!("{} holds no sluice data", data_dir.display()),
        ));
    }
    if dest.exists()
        && std::fs::read_dir(dest)
            .map_err(io(format!("cannot list {}", dest.display())))?
            .next()
            .is_some()
    {
        return Err(EngineError::new(
            ErrorKind::Config,
            format!(
                "{} is not empty: a backup goes into a new directory",
                dest.display()
            ),
        ));
    }
    let mut files = Vec::new();
    for (rel, database) in files_of(data_dir)? {
        let from = data_dir.join(&rel);
        let to = dest.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("cannot create {}", parent.display())))?;
        }
        if database {
            snapshot(&from, &to).await?;
        } else {
            std::fs::copy(&from, &to).map_err(io(format!("cannot copy {}", from.display())))?;
        }
        let (bytes, sha256) = sha256_of(&to)?;
        files.push(BackupFile {
            path: rel,
            bytes,
            sha256,
            database,
        });
    }
    let manifest = BackupManifest {
        created_at: chrono::Utc::now().to_rfc3339(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        files,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| {
        EngineError::new(ErrorKind::Config, "cannot write the manifest").with_source(e)
    })?;
    std::fs::write(dest.join(MANIFEST), text).map_err(io(format!(
        "cannot write {}",
        dest.join(MANIFEST).display()
    )))?;
    Ok(manifest)
}

/// `VACUUM INTO`: one consistent snapshot of the database at `from`, written to `to`.
async fn snapshot(from: &Path, to: &Path) -> Result<()> {
    let options = SqliteConnectOptions::new()
        .filename(from)
        .read_only(true)
        .busy_timeout(Duration::from_secs(60));
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| EngineError::from_sqlx(format!("opening {}", from.display()), e))?;
    let target = to.to_string_lossy().replace('\'', "''");
    conn.execute(sqlx::AssertSqlSafe(format!("VACUUM INTO '{target}'")))
        .await
        .map_err(|e| EngineError::from_sqlx(format!("snapshotting {}", from.display()), e))?;
    conn.close().await.ok();
    Ok(())
}

/// Reads the manifest of the backup in `src` and checks every file against it.
pub fn verify_backup(src: &Path) -> Result<BackupManifest> {
    let path = src.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(format!(
        "{} is not a sluice backup (no {MANIFEST})",
        src.display()
    )))?;
    let manifest: BackupManifest = serde_json::from_str(&text).map_err(|e| {
        EngineError::new(
            ErrorKind::Config,
            format!("{} is not a sluice backup manifest", path.display()),
        )
        .with_source(e)
    })?;
    for f in &manifest.files {
        if f.path
            .split('/')
            .any(|part| part == ".." || part.is_empty())
        {
            return Err(EngineError::new(
                ErrorKind::Config,
                format!("the manifest names a path outside the backup: {}", f.path),
            ));
        }
        let (bytes, sha256) = sha256_of(&src.join(&f.path))?;
        if bytes != f.bytes || sha256 != f.sha256 {
            return Err(EngineError::new(
                ErrorKind::Config,
                format!(
                    "{} in the backup does not match its manifest (altered or truncated)",
                    f.path
                ),
            ));
        }
    }
    Ok(manifest)
}

/// Restores the backup in `src` into `data_dir`, whose processes must be stopped. Every
/// file is checked first; a data directory that holds sluice data is replaced only with
/// `force`, and not while a process is writing to one of its databases.
pub async fn restore_data_dir(src: &Path, data_dir: &Path, force: bool) -> Result<BackupManifest> {
    let manifest = verify_backup(src)?;
    let existing = if data_dir.exists() {
        files_of(data_dir)?
    } else {
        Vec::new()
    };
    if !existing.is_empty() && !force {
        return Err(EngineError::new(
            ErrorKind::Config,
            format!(
                "{} already holds sluice data: pass --force to replace it",
                data_dir.display()
            ),
        ));
    }
    for (rel, database) in &existing {
        if *database {
            ensure_idle(&data_dir.join(rel)).await?;
        }
    }
    for (rel, _) in &existing {
        let path = data_dir.join(rel);
        for companion in ["", "-wal", "-shm", "-journal"] {
            let p = PathBuf::from(format!("{}{companion}", path.display()));
            if p.exists() {
                std::fs::remove_file(&p).map_err(io(format!("cannot remove {}", p.display())))?;
            }
        }
    }
    for f in &manifest.files {
        let to = data_dir.join(&f.path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("cannot create {}", parent.display())))?;
        }
        let partial = PathBuf::from(format!("{}.restoring", to.display()));
        std::fs::copy(src.join(&f.path), &partial)
            .map_err(io(format!("cannot write {}", partial.display())))?;
        std::fs::rename(&partial, &to).map_err(io(format!("cannot write {}", to.display())))?;
    }
    Ok(manifest)
}

/// Fails when another connection holds the database at `path` for writing (a running
/// process): its write lock cannot be taken at once.
async fn ensure_idle(path: &Path) -> Result<()> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_millis(200));
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| EngineError::from_sqlx(format!("opening {}", path.display()), e))?;
    let taken = conn.execute("BEGIN IMMEDIATE").await;
    let _ = conn.execute("ROLLBACK").await;
    conn.close().await.ok();
    taken.map(|_| ()).map_err(|_| {
        EngineError::new(
            ErrorKind::Config,
            format!(
                "{} is in use: stop sluice's processes on this data directory before restoring",
                path.display()
            ),
        )
    })
}
