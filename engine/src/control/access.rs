//! Who may do what: API keys with roles (stored hashed), tenants and the audit log.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{EngineError, ErrorKind, Result};
use crate::tenant::TenantSlug;

/// What an API key may do. Tenant roles are ordered: each can do what the ones before it
/// can. A platform key belongs to no tenant and provisions tenants.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads pipelines, runs and connector status.
    Viewer,
    /// Adds finance and reading quarantine.
    Analyst,
    /// Adds triggering syncs and uploading files.
    Operator,
    /// Adds managing pipelines, credentials, quarantine fixes, dead letters and keys.
    Admin,
    /// No tenant: provisions tenants and their first keys.
    Platform,
}

impl Role {
    /// The stored word.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Analyst => "analyst",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Platform => "platform",
        }
    }

    /// Parses a stored word.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Role::Viewer,
            Role::Analyst,
            Role::Operator,
            Role::Admin,
            Role::Platform,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// A stored API key (its secret is not stored: only its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ApiKeyRecord {
    /// Stable id.
    pub id: String,
    /// The key's public prefix (how it is found and shown).
    pub prefix: String,
    /// SHA-256 of the whole key, hex.
    #[serde(skip)]
    pub hash: String,
    /// The tenant; none for a platform key.
    pub tenant: Option<String>,
    /// What it may do.
    pub role: Role,
    /// A label.
    pub name: Option<String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A freshly made key: the record to store and the secret to show once.
pub struct NewApiKey {
    /// What is stored.
    pub record: ApiKeyRecord,
    /// The whole key, `slk_<prefix>_<secret>`; shown once, never stored.
    pub secret: String,
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a key, hex.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The prefix of a presented key (`slk_<prefix>_<secret>`), if it has the key's shape.
pub fn key_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("slk_")?;
    let (prefix, secret) = rest.split_once('_')?;
    (prefix.len() == 12
        && secret.len() == 64
        && prefix.bytes().all(|b| b.is_ascii_hexdigit())
        && secret.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some(prefix)
}

/// Compares two hashes in time independent of where they differ.
pub fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `bytes` random bytes as hex, from the operating system's generator (through v4 UUIDs):
/// API keys, console session ids.
pub fn random_hex(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2);
    while out.len() < bytes * 2 {
        out.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    // v4 UUIDs carry 122 random bits in 128: take whole random nibbles from several.
    out.truncate(bytes * 2);
    out
}

impl NewApiKey {
    /// Makes a random key for `tenant` (none: a platform key) with `role`.
    pub fn generate(tenant: Option<&TenantSlug>, role: Role, name: Option<&str>) -> Result<Self> {
        if tenant.is_none() != (role == Role::Platform) {
            return Err(EngineError::new(
                ErrorKind::Config,
                "a platform key has no tenant; every other key has one",
            ));
        }
        let prefix = random_hex(6);
        let secret = format!("slk_{prefix}_{}", random_hex(32));
        Ok(NewApiKey {
            record: ApiKeyRecord {
                id: uuid::Uuid::now_v7().to_string(),
                prefix,
                hash: hash_key(&secret),
                tenant: tenant.map(ToString::to_string),
                role,
                name: name.map(str::to_string),
                created_at: Utc::now(),
                revoked_at: None,
            },
            secret,
        })
    }
}

/// One audit log entry: who did what to what, with before/after where it applies.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Increasing id (the list's cursor).
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// The key id (or `cli`).
    pub actor: String,
    /// e.g. `pipeline.update`, `quarantine.fix`.
    pub action: String,
    /// The tenant concerned.
    pub tenant: Option<String>,
    /// What was acted on.
    pub target: String,
    /// Details: before/after, reasons (never secrets).
    pub detail: Value,
}

/// A console session: a key that signed in through the browser. Its id lives only in the
/// browser's cookie; the store keeps the id's hash, so a leaked table opens no session.
/// The key is found again on every request, so revoking it ends its sessions at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 of the session id, hex.
    pub id_hash: String,
    /// The prefix of the key that signed in.
    pub key_prefix: String,
    /// When it signed in (the absolute expiry counts from here).
    pub created_at: DateTime<Utc>,
    /// When it was last used (the idle expiry counts from here).
    pub last_seen_at: DateTime<Utc>,
}

/// API keys, console sessions, tenants and the audit log.
pub trait AccessStore: Send + Sync {
    /// Creates a tenant's store; false when the tenant exists already.
    fn provision_tenant(
        &self,
        tenant: &TenantSlug,
        name: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Stores a new key.
    fn create_key(&self, key: &ApiKeyRecord) -> impl Future<Output = Result<()>> + Send;

    /// The key with this prefix, revoked or not.
    fn key_by_prefix(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Option<ApiKeyRecord>>> + Send;

    /// Keys of a tenant (none: platform keys), newest first.
    fn keys(
        &self,
        tenant: Option<&TenantSlug>,
    ) -> impl Future<Output = Result<Vec<ApiKeyRecord>>> + Send;

    /// Revokes a key of `tenant` (none: a platform key); false when there is no such
    /// live key.
    fn revoke_key(
        &self,
        tenant: Option<&TenantSlug>,
        id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Stores a new console session, first deleting sessions unused since `idle_before`.
    fn start_session(
        &self,
        session: &ConsoleSession,
        idle_before: DateTime<Utc>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The session whose id hashes to `id_hash`.
    fn session(&self, id_hash: &str)
    -> impl Future<Output = Result<Option<ConsoleSession>>> + Send;

    /// Records that the session was used at `at`.
    fn touch_session(
        &self,
        id_hash: &str,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Ends a session (signing out).
    fn end_session(&self, id_hash: &str) -> impl Future<Output = Result<()>> + Send;

    /// Appends to the audit log.
    fn record_audit(
        &self,
        actor: &str,
        action: &str,
        tenant: Option<&TenantSlug>,
        target: &str,
        detail: &Value,
    ) -> impl Future<Output = Result<()>> + Send;

    /// A tenant's audit log, newest first, entries before `before` (an id).
    fn audit_log(
        &self,
        tenant: &TenantSlug,
        before: Option<i64>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AuditEntry>>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_hashed_and_recognised_by_shape() {
        let t = TenantSlug::parse("acme").expect("slug");
        let a = NewApiKey::generate(Some(&t), Role::Admin, None).expect("key");
        let b = NewApiKey::generate(Some(&t), Role::Admin, None).expect("key");
        assert_ne!(a.secret, b.secret);
        assert_eq!(key_prefix(&a.secret), Some(a.record.prefix.as_str()));
        assert!(same_hash(&hash_key(&a.secret), &a.record.hash));
        assert!(!same_hash(&hash_key(&b.secret), &a.record.hash));
        assert!(!a.record.hash.contains(&a.secret[17..]));
        assert!(!format!("{a:?}").contains(&a.secret));
        assert_eq!(key_prefix("slk_short_abc"), None);
        assert_eq!(key_prefix("Bearer x"), None);
        assert!(NewApiKey::generate(None, Role::Admin, None).is_err());
        assert!(NewApiKey::generate(Some(&t), Role::Platform, None).is_err());
        assert!(NewApiKey::generate(None, Role::Platform, None).is_ok());
        assert!(Role::Viewer < Role::Analyst && Role::Operator < Role::Admin);
    }
}
