//! `sluice backup` / `sluice restore`: the embedded warehouse's data directory, copied
//! consistently while it is in use, and put back after checking every file.

use anyhow::Result;
use clap::Args;
use sluice_engine::warehouse::{BackupManifest, backup_data_dir, restore_data_dir};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub(super) struct BackupArgs {
    /// A new (or empty) directory to write the backup into.
    dest: PathBuf,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct RestoreArgs {
    /// A directory `sluice backup` wrote.
    src: PathBuf,
    /// Replace the sluice data already in --data-dir.
    #[arg(long)]
    force: bool,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn backup(data_dir: &Path, args: &BackupArgs) -> Result<ExitCode> {
    let manifest = backup_data_dir(data_dir, &args.dest).await?;
    report(
        &manifest,
        &format!(
            "backed up {} into {}",
            data_dir.display(),
            args.dest.display()
        ),
        args.json,
    )
}

pub(super) async fn restore(data_dir: &Path, args: &RestoreArgs) -> Result<ExitCode> {
    let manifest = restore_data_dir(&args.src, data_dir, args.force).await?;
    report(
        &manifest,
        &format!(
            "restored the backup of {} into {}",
            manifest.created_at,
            data_dir.display()
        ),
        args.json,
    )
}

fn report(manifest: &BackupManifest, what: &str, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(manifest)?);
    } else {
        let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
        println!("{what}: {} file(s), {bytes} bytes", manifest.files.len());
        for f in &manifest.files {
            println!("  {:<50} {:>12}  {}", f.path, f.bytes, &f.sha256[..16]);
        }
    }
    Ok(ExitCode::SUCCESS)
}
