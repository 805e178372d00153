//! `sluice master-key rotate` and `sluice tenant rotate-key`: re-keying stored secrets, on
//! either warehouse.

use anyhow::{Result, bail};
use clap::Subcommand;
use sluice_engine::TenantSlug;
use sluice_engine::control::KeyRotation;
use sluice_engine::secrets::{DataKey, MasterKey};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub(super) enum MasterKeyCommand {
    /// Re-wrap every tenant's data key under a new master key, in one transaction (a crash
    /// part-way changes nothing). The current key (SLUICE_MASTER_KEY, or
    /// SLUICE_MASTER_KEY_PREVIOUS while a rotation is rolled out) opens each key.
    #[command(after_help = "Example:\n  \
        openssl rand -hex 32 > new.key\n  \
        sluice master-key rotate --new-key-file new.key\n  \
        # then run every process with SLUICE_MASTER_KEY_FILE=new.key and, until all are\n  \
        # restarted, SLUICE_MASTER_KEY_PREVIOUS holding the old key (docs/operations.md)")]
    Rotate {
        /// A file holding the new key: 64 hex characters (`openssl rand -hex 32`).
        #[arg(long)]
        new_key_file: PathBuf,
    },
}

pub(super) async fn master_key_command<W: KeyRotation>(
    warehouse: &W,
    cmd: MasterKeyCommand,
) -> Result<ExitCode> {
    match cmd {
        MasterKeyCommand::Rotate { new_key_file } => {
            let Some(new) = MasterKey::from_sources(None, Some(new_key_file))? else {
                bail!("no new key given");
            };
            if let Some(current) = MasterKey::from_env_if_set()? {
                let probe = DataKey::generate();
                if current
                    .unwrap_key(&new.wrap(&probe, "probe"), "probe")
                    .is_ok()
                {
                    bail!(
                        "the new key opens what the current key (or its previous one) wraps: give a key of its own (`openssl rand -hex 32`)"
                    );
                }
            }
            let n = warehouse.rewrap_tenant_keys(&new).await?;
            println!(
                "re-wrapped the data keys of {n} tenant(s) under the new master key; run every process with it now"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice tenant rotate-key T`.
pub(super) async fn rotate_tenant_key<W: KeyRotation>(
    warehouse: &W,
    slug: &str,
) -> Result<ExitCode> {
    let tenant = TenantSlug::parse(slug)?;
    let n = warehouse.rotate_tenant_key(&tenant).await?;
    println!(
        "tenant {tenant} has a new data key; {n} secret(s) of its pipelines and webhook endpoints were re-sealed"
    );
    Ok(ExitCode::SUCCESS)
}
