//! Rotating the keys that protect stored secrets: the master key, which wraps every
//! tenant's data key, and a tenant's data key, which seals its pipelines' secrets. Each
//! rotation is one transaction: a crash part-way leaves every key and secret as it was, so
//! each stays readable with the key it was readable with before.

use std::future::Future;

use crate::error::Result;
use crate::secrets::MasterKey;
use crate::tenant::TenantSlug;

/// A warehouse whose stored keys and secrets can be re-keyed.
pub trait KeyRotation: Send + Sync {
    /// Re-wraps every tenant's data key under `new`, opening each with the warehouse's
    /// master key (or the previous one it was given), in one transaction. Returns how many
    /// tenants' keys were re-wrapped. A key that opens with neither fails the whole
    /// rotation and changes nothing.
    fn rewrap_tenant_keys(&self, new: &MasterKey) -> impl Future<Output = Result<usize>> + Send;

    /// Gives `tenant` a fresh data key and re-seals its pipelines' and webhook endpoints'
    /// secrets under it, in one transaction, while saves of the tenant's pipelines wait.
    /// Returns how many secrets (pipelines' and endpoints') were re-sealed.
    fn rotate_tenant_key(&self, tenant: &TenantSlug) -> impl Future<Output = Result<usize>> + Send;
}
