//! Key rotation in the control database: the tenants' wrapped data keys and the pipelines'
//! sealed secrets, each rotation in one write transaction.

use super::SqliteWarehouse;
use crate::control::{KeyRotation, no_master_key, secrets_context, webhook_secret_context};
use crate::error::{EngineError, Result};
use crate::secrets::{DataKey, MasterKey};
use crate::tenant::TenantSlug;

impl KeyRotation for SqliteWarehouse {
    async fn rewrap_tenant_keys(&self, new: &MasterKey) -> Result<usize> {
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        let mut tx = self.control_write().await?;
        let tenants: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT tenant, wrapped_key FROM tenant_keys ORDER BY tenant")
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx("reading the tenants' keys", e))?;
        for (tenant, wrapped) in &tenants {
            let key = master.unwrap_key(wrapped, tenant)?;
            sqlx::query("UPDATE tenant_keys SET wrapped_key = ? WHERE tenant = ?")
                .bind(new.wrap(&key, tenant))
                .bind(tenant)
                .execute(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx("storing a re-wrapped key", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the master key rotation", e))?;
        Ok(tenants.len())
    }

    async fn rotate_tenant_key(&self, tenant: &TenantSlug) -> Result<usize> {
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        let mut tx = self.control_write().await?;
        let old = self.data_key_in(&mut tx, tenant).await?;
        let new = DataKey::generate();
        let sealed: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT name, secrets FROM pipelines WHERE tenant = ? AND secrets IS NOT NULL ORDER BY name",
        )
        .bind(tenant.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| EngineError::from_sqlx("reading the tenant's secrets", e))?;
        for (name, bytes) in &sealed {
            let context = secrets_context(tenant, name);
            let plain = zeroize::Zeroizing::new(old.open(bytes, &context)?);
            sqlx::query("UPDATE pipelines SET secrets = ? WHERE tenant = ? AND name = ?")
                .bind(new.seal(&plain, &context))
                .bind(tenant.as_str())
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx("storing re-sealed secrets", e))?;
        }
        let hooks: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, secret FROM webhook_endpoints WHERE tenant = ? ORDER BY id")
                .bind(tenant.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx("reading the tenant's webhook secrets", e))?;
        for (id, bytes) in &hooks {
            let context = webhook_secret_context(tenant, id);
            let plain = zeroize::Zeroizing::new(old.open(bytes, &context)?);
            sqlx::query("UPDATE webhook_endpoints SET secret = ? WHERE tenant = ? AND id = ?")
                .bind(new.seal(&plain, &context))
                .bind(tenant.as_str())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| EngineError::from_sqlx("storing a re-sealed webhook secret", e))?;
        }
        sqlx::query("UPDATE tenant_keys SET wrapped_key = ? WHERE tenant = ?")
            .bind(master.wrap(&new, tenant.as_str()))
            .bind(tenant.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| EngineError::from_sqlx("storing the new tenant key", e))?;
        tx.commit()
            .await
            .map_err(|e| EngineError::from_sqlx("committing the tenant key rotation", e))?;
        Ok(sealed.len() + hooks.len())
    }
}
