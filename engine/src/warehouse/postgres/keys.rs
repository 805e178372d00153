//! Key rotation in the control schema: the tenants' wrapped data keys and the pipelines'
//! sealed secrets, each rotation in one transaction.

use super::{PostgresWarehouse, db, missing_tenant};
use crate::control::{KeyRotation, no_master_key, secrets_context, webhook_secret_context};
use crate::error::Result;
use crate::secrets::{DataKey, MasterKey};
use crate::tenant::TenantSlug;

impl KeyRotation for PostgresWarehouse {
    async fn rewrap_tenant_keys(&self, new: &MasterKey) -> Result<usize> {
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the master key rotation"))?;
        // FOR UPDATE: a pipeline save (which reads its tenant's key FOR SHARE) waits.
        let tenants: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT slug, wrapped_key FROM sluice.tenants ORDER BY slug FOR UPDATE")
                .fetch_all(&mut *tx)
                .await
                .map_err(db("reading the tenants' keys"))?;
        for (slug, wrapped) in &tenants {
            let key = master.unwrap_key(wrapped, slug)?;
            sqlx::query("UPDATE sluice.tenants SET wrapped_key = $2 WHERE slug = $1")
                .bind(slug)
                .bind(new.wrap(&key, slug))
                .execute(&mut *tx)
                .await
                .map_err(db("storing a re-wrapped key"))?;
        }
        self.fire("rotation_before_commit", &mut tx, 0).await?;
        tx.commit()
            .await
            .map_err(db("committing the master key rotation"))?;
        Ok(tenants.len())
    }

    async fn rotate_tenant_key(&self, tenant: &TenantSlug) -> Result<usize> {
        let master = self.master.as_deref().ok_or_else(no_master_key)?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the tenant key rotation"))?;
        let wrapped: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT wrapped_key FROM sluice.tenants WHERE slug = $1 FOR UPDATE")
                .bind(tenant.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("reading the tenant key"))?;
        let old = master.unwrap_key(
            &wrapped.ok_or_else(|| missing_tenant(tenant))?,
            tenant.as_str(),
        )?;
        let new = DataKey::generate();
        let sealed: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT name, secrets FROM sluice.pipelines WHERE tenant = $1 AND secrets IS NOT NULL \
             ORDER BY name FOR UPDATE",
        )
        .bind(tenant.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading the tenant's secrets"))?;
        for (name, bytes) in &sealed {
            let context = secrets_context(tenant, name);
            let plain = zeroize::Zeroizing::new(old.open(bytes, &context)?);
            sqlx::query("UPDATE sluice.pipelines SET secrets = $3 WHERE tenant = $1 AND name = $2")
                .bind(tenant.as_str())
                .bind(name)
                .bind(new.seal(&plain, &context))
                .execute(&mut *tx)
                .await
                .map_err(db("storing re-sealed secrets"))?;
        }
        let hooks: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, secret FROM sluice.webhook_endpoints WHERE tenant = $1 ORDER BY id FOR UPDATE",
        )
        .bind(tenant.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading the tenant's webhook secrets"))?;
        for (id, bytes) in &hooks {
            let context = webhook_secret_context(tenant, id);
            let plain = zeroize::Zeroizing::new(old.open(bytes, &context)?);
            sqlx::query(
                "UPDATE sluice.webhook_endpoints SET secret = $3 WHERE tenant = $1 AND id = $2",
            )
            .bind(tenant.as_str())
            .bind(id)
            .bind(new.seal(&plain, &context))
            .execute(&mut *tx)
            .await
            .map_err(db("storing a re-sealed webhook secret"))?;
        }
        sqlx::query("UPDATE sluice.tenants SET wrapped_key = $2 WHERE slug = $1")
            .bind(tenant.as_str())
            .bind(master.wrap(&new, tenant.as_str()))
            .execute(&mut *tx)
            .await
            .map_err(db("storing the new tenant key"))?;
        self.fire("rotation_before_commit", &mut tx, 0).await?;
        tx.commit()
            .await
            .map_err(db("committing the tenant key rotation"))?;
        Ok(sealed.len() + hooks.len())
    }
}
