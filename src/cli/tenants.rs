//! `sluice tenant create | list | rotate-key`: tenants of the PostgreSQL warehouse.

use anyhow::Result;
use clap::Subcommand;
use sluice_engine::TenantSlug;
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::PostgresWarehouse;
use std::process::ExitCode;

#[derive(Subcommand)]
pub(super) enum TenantCommand {
    /// Create a tenant: its schema, migrated, and its encrypted data key (needs SLUICE_MASTER_KEY).
    #[command(
        after_help = "Example:\n  SLUICE_MASTER_KEY=$(openssl rand -hex 32) sluice --database-url postgres://127.0.0.1/sluice tenant create acme --name \"Acme Corp\""
    )]
    Create {
        /// The slug: 2-40 characters, a lower-case letter first, then a-z, 0-9 or _.
        slug: String,
        /// Display name (defaults to the slug).
        #[arg(long)]
        name: Option<String>,
    },
    /// List tenants.
    #[command(
        after_help = "Example:\n  sluice --database-url postgres://127.0.0.1/sluice tenant list --json"
    )]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a tenant a new data key and re-seal its pipelines' secrets under it, in one
    /// transaction (either warehouse; saves of its pipelines wait meanwhile).
    #[command(
        name = "rotate-key",
        after_help = "Example:\n  sluice tenant rotate-key acme"
    )]
    RotateKey {
        /// The tenant.
        slug: String,
    },
}

pub(super) async fn tenant(warehouse: &PostgresWarehouse, cmd: TenantCommand) -> Result<ExitCode> {
    match cmd {
        TenantCommand::Create { slug, name } => {
            let tenant = TenantSlug::parse(&slug)?;
            let master = MasterKey::from_env()?;
            let info = warehouse
                .create_tenant(&tenant, name.as_deref().unwrap_or(&slug), &master)
                .await?;
            println!(
                "created tenant {} (schema {}, version {})",
                info.slug, info.schema, info.schema_version
            );
        }
        TenantCommand::RotateKey { slug } => {
            return super::rotate::rotate_tenant_key(warehouse, &slug).await;
        }
        TenantCommand::List { json } => {
            let tenants = warehouse.list_tenants().await?;
            if json {
                println!("{}", serde_json::to_string(&tenants)?);
            } else {
                for t in &tenants {
                    println!(
                        "{:<40} {:<30} schema {} v{}",
                        t.slug, t.name, t.schema, t.schema_version
                    );
                }
                println!("{} tenant(s)", tenants.len());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
