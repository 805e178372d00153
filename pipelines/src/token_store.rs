//! Where QuickBooks pipelines keep the refresh token QuickBooks rotates: in the pipelines'
//! secrets in the control store (sealed under the tenant's key). One connection (a company
//! and an app) serves several pipelines, one per stream, and has one current token, so a
//! pipeline saves the token with the connection's name (`oauth.connection`), when
//! (`oauth.saved_at`) and a hash of the token it was configured with (`oauth.seed`); it
//! reads the newest token saved by any pipeline of the same connection. A configured token
//! that no pipeline has seen before is a reconnection and wins over the saved ones.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use sluice_connectors::saas::TokenStore;
use sluice_connectors::{SourceError, SourceErrorKind};
use sluice_engine::TenantSlug;
use sluice_engine::control::{PipelineChange, PipelineOrigin, PipelineStore};

use crate::spec::PipelineSpec;

const TOKEN: &str = "oauth.refresh_token";
const SEED: &str = "oauth.seed";
const CONNECTION: &str = "oauth.connection";
const SAVED_AT: &str = "oauth.saved_at";

/// A [`TokenStore`] in the control store, for one pipeline of a connection.
pub struct StoredTokens<S> {
    store: Arc<S>,
    spec: PipelineSpec,
    connection: String,
    configured: String,
}

fn hash(token: &str) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(token.as_bytes()))
}

impl<S: PipelineStore + 'static> StoredTokens<S> {
    /// The token store of `spec`, a pipeline of `connection` (e.g. `realm/client id`)
    /// configured with the refresh token `configured`.
    pub fn new(store: Arc<S>, spec: &PipelineSpec, connection: &str, configured: &str) -> Self {
        StoredTokens {
            store,
            spec: spec.clone(),
            connection: connection.to_string(),
            configured: configured.to_string(),
        }
    }

    fn tenant(&self) -> Result<TenantSlug, SourceError> {
        TenantSlug::parse(&self.spec.tenant)
            .map_err(|e| SourceError::new(SourceErrorKind::Config, e.to_string()))
    }
}

fn store_error(what: &str, e: sluice_engine::EngineError) -> SourceError {
    let kind = if e.kind().is_transient() {
        SourceErrorKind::Transient
    } else {
        SourceErrorKind::Config
    };
    SourceError::new(kind, format!("{what}: {e}"))
}

/// The newest token of `connection` among `pipelines`' secrets, unless `configured` is a
/// token none of them has seen (a reconnection).
fn newest<'a>(
    pipelines: impl Iterator<Item = &'a Map<String, Value>>,
    connection: &str,
    configured: &str,
) -> Option<String> {
    let mine: Vec<&Map<String, Value>> = pipelines
        .filter(|s| s.get(CONNECTION).and_then(Value::as_str) == Some(connection))
        .collect();
    let configured_hash = hash(configured);
    let known = mine.iter().any(|s| {
        s.get(SEED).and_then(Value::as_str) == Some(configured_hash.as_str())
            || s.get(TOKEN).and_then(Value::as_str) == Some(configured)
    });
    if !known {
        return None;
    }
    mine.iter()
        .filter_map(|s| {
            Some((
                s.get(SAVED_AT)?.as_i64()?,
                s.get(TOKEN)?.as_str()?.to_string(),
            ))
        })
        .max()
        .map(|(_, token)| token)
}

impl<S: PipelineStore + 'static> TokenStore for StoredTokens<S> {
    fn load(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Option<String>, SourceError>> + Send + '_>> {
        Box::pin(async move {
            let tenant = self.tenant()?;
            let pipelines = self
                .store
                .pipelines(&tenant)
                .await
                .map_err(|e| store_error("reading the saved refresh tokens", e))?;
            if !pipelines.iter().any(|p| p.name == self.spec.name) {
                // Register the pipeline now, before any token is rotated: a store that
                // cannot keep secrets (no master key) fails here, while the configured
                // token still works, not after the service has replaced it.
                let (fields, secrets) = self.spec.to_stored();
                let change = PipelineChange::shell_register(
                    json!({ "secrets": secrets.keys().collect::<Vec<_>>() }),
                );
                self.store
                    .save_pipeline(&tenant, &self.spec.name, &fields, &secrets, &change)
                    .await
                    .map_err(|e| {
                        store_error(
                            "registering the pipeline to keep its rotated refresh token",
                            e,
                        )
                    })?;
            }
            Ok(newest(
                pipelines.iter().map(|p| &p.secrets),
                &self.connection,
                &self.configured,
            ))
        })
    }

    fn save<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send + 'a>> {
        Box::pin(async move {
            let tenant = self.tenant()?;
            let (fields, mut secrets, origin) = match self
                .store
                .pipeline(&tenant, &self.spec.name)
                .await
                .map_err(|e| store_error("reading the pipeline to save its refresh token", e))?
            {
                Some(p) => (p.spec, p.secrets, p.origin),
                None => {
                    let (fields, secrets) = self.spec.to_stored();
                    (fields, secrets, PipelineOrigin::Shell)
                }
            };
            secrets.insert(CONNECTION.into(), json!(self.connection));
            secrets.insert(SEED.into(), json!(hash(&self.configured)));
            secrets.insert(TOKEN.into(), json!(token));
            secrets.insert(
                SAVED_AT.into(),
                json!(chrono::Utc::now().timestamp_micros()),
            );
            let change = PipelineChange {
                actor: "sluice".into(),
                action: "pipeline.token_rotated",
                origin,
                detail: json!({ "connection": self.connection }),
            };
            self.store
                .save_pipeline(&tenant, &self.spec.name, &fields, &secrets, &change)
                .await
                .map_err(|e| store_error("saving the rotated refresh token", e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(connection: &str, seed: &str, token: &str, at: i64) -> Map<String, Value> {
        let v = json!({ CONNECTION: connection, SEED: hash(seed), TOKEN: token, SAVED_AT: at });
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_newest_token_of_the_connection_wins_unless_the_configured_one_is_new() {
        let all = [
            saved("1/app", "rt-0", "rt-1", 10),
            saved("1/app", "rt-0", "rt-3", 30),
            saved("2/app", "rt-0", "rt-9", 90),
        ];
        assert_eq!(newest(all.iter(), "1/app", "rt-0").as_deref(), Some("rt-3"));
        // A pipeline configured later with a token one of them saved knows it too.
        assert_eq!(newest(all.iter(), "1/app", "rt-1").as_deref(), Some("rt-3"));
        // A token nobody has seen: the company was reconnected.
        assert_eq!(newest(all.iter(), "1/app", "rt-new"), None);
        assert_eq!(newest(all.iter(), "3/app", "rt-0"), None);
    }
}
