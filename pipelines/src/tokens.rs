//! Where a QuickBooks pipeline keeps the refresh token QuickBooks rotates: in the
//! pipeline's secrets in the control store (sealed under the tenant's key), as
//! `oauth.refresh_token`, with `oauth.seed`, a hash of the `refresh_token` the pipeline was
//! configured with. A saved token is used only while the configured one is still that
//! seed: after an admin reconnects and configures a new token, the new one wins.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;
use sluice_connectors::api::TokenStore;
use sluice_connectors::{SourceError, SourceErrorKind};
use sluice_engine::TenantSlug;
use sluice_engine::control::PipelineStore;

use crate::spec::PipelineSpec;

const TOKEN: &str = "oauth.refresh_token";
const SEED: &str = "oauth.seed";

/// A [`TokenStore`] in the control store, for one pipeline.
pub struct StoredTokens<S> {
    store: Arc<S>,
    spec: PipelineSpec,
    seed: String,
}

impl<S: PipelineStore + 'static> StoredTokens<S> {
    /// The token store of `spec` (whose configured refresh token is `configured`).
    pub fn new(store: Arc<S>, spec: &PipelineSpec, configured: &str) -> Self {
        StoredTokens {
            store,
            spec: spec.clone(),
            seed: format!(
                "{:032x}",
                xxhash_rust::xxh3::xxh3_128(configured.as_bytes())
            ),
        }
    }

    fn tenant(&self) -> Result<TenantSlug, SourceError> {
        TenantSlug::parse(&self.spec.tenant)
            .map_err(|e| SourceError::new(SourceErrorKind::Config, e.to_string()))
    }
}

fn store_error(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::new(SourceErrorKind::Transient, format!("{what}: {e}"))
}

impl<S: PipelineStore + 'static> TokenStore for StoredTokens<S> {
    fn load(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Option<String>, SourceError>> + Send + '_>> {
        Box::pin(async move {
            let tenant = self.tenant()?;
            let stored = self
                .store
                .pipeline(&tenant, &self.spec.name)
                .await
                .map_err(|e| store_error("reading the saved refresh token", e))?;
            Ok(stored.and_then(|p| {
                (p.secrets.get(SEED).and_then(Value::as_str) == Some(self.seed.as_str()))
                    .then(|| {
                        p.secrets
                            .get(TOKEN)
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .flatten()
            }))
        })
    }

    fn save<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send + 'a>> {
        Box::pin(async move {
            let tenant = self.tenant()?;
            let (fields, mut secrets) = match self
                .store
                .pipeline(&tenant, &self.spec.name)
                .await
                .map_err(|e| store_error("reading the pipeline to save its refresh token", e))?
            {
                Some(p) => (p.spec, p.secrets),
                None => self.spec.to_stored(),
            };
            secrets.insert(SEED.into(), Value::String(self.seed.clone()));
            secrets.insert(TOKEN.into(), Value::String(token.to_string()));
            self.store
                .save_pipeline(&tenant, &self.spec.name, &fields, &secrets)
                .await
                .map_err(|e| store_error("saving the rotated refresh token", e))
        })
    }
}
