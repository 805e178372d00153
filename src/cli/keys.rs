//! `sluice key create | list | revoke`: API keys.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::json;
use sluice_engine::TenantSlug;
use std::process::ExitCode;

#[derive(Subcommand)]
pub(super) enum KeyCommand {
    /// Make a key of a tenant with a role, or a platform key; prints the key alone.
    #[command(
        after_help = "Example:\n  sluice key create --tenant acme --role operator\n  sluice key create --platform"
    )]
    Create {
        /// The tenant.
        #[arg(long, required_unless_present = "platform")]
        tenant: Option<String>,
        /// viewer, analyst, operator or admin.
        #[arg(long, required_unless_present = "platform")]
        role: Option<String>,
        /// A platform key (no tenant): provisions tenants and their keys.
        #[arg(long, conflicts_with_all = ["tenant", "role"])]
        platform: bool,
        /// A label.
        #[arg(long)]
        name: Option<String>,
    },
    /// List a tenant's keys (or the platform keys): id, prefix, role, revoked.
    List {
        /// The tenant; without it, platform keys.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key.
    Revoke {
        /// The key's id.
        id: String,
        /// Its tenant; without it, a platform key.
        #[arg(long)]
        tenant: Option<String>,
    },
}

pub(super) async fn key_command<W: sluice_engine::Store>(
    warehouse: &W,
    cmd: KeyCommand,
) -> Result<ExitCode> {
    use sluice_engine::control::{NewApiKey, Role};
    match cmd {
        KeyCommand::Create {
            tenant,
            role,
            platform,
            name,
        } => {
            let (tenant, role) = if platform {
                (None, Role::Platform)
            } else {
                let role = role.as_deref().unwrap_or_default();
                let role = Role::parse(role)
                    .filter(|r| *r != Role::Platform)
                    .with_context(|| {
                        format!("unknown role {role:?}: viewer, analyst, operator or admin")
                    })?;
                (
                    Some(TenantSlug::parse(tenant.as_deref().unwrap_or_default())?),
                    role,
                )
            };
            let made = NewApiKey::generate(tenant.as_ref(), role, name.as_deref())?;
            warehouse.create_key(&made.record).await?;
            warehouse
                .record_audit(
                    "cli",
                    "key.create",
                    tenant.as_ref(),
                    &made.record.id,
                    &json!({ "role": role, "prefix": made.record.prefix }),
                )
                .await?;
            println!("{}", made.secret);
        }
        KeyCommand::List { tenant, json } => {
            let tenant = tenant.as_deref().map(TenantSlug::parse).transpose()?;
            let keys = warehouse.keys(tenant.as_ref()).await?;
            if json {
                println!("{}", serde_json::to_string(&keys)?);
            } else {
                for k in &keys {
                    println!(
                        "{:<36}  slk_{}_…  {:<9} {}{}",
                        k.id,
                        k.prefix,
                        k.role.as_str(),
                        k.created_at,
                        if k.revoked_at.is_some() {
                            "  revoked"
                        } else {
                            ""
                        }
                    );
                }
                println!("{} key(s)", keys.len());
            }
        }
        KeyCommand::Revoke { id, tenant } => {
            let tenant = tenant.as_deref().map(TenantSlug::parse).transpose()?;
            if !warehouse.revoke_key(tenant.as_ref(), &id).await? {
                bail!("no live key {id}");
            }
            warehouse
                .record_audit("cli", "key.revoke", tenant.as_ref(), &id, &json!({}))
                .await?;
            println!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
