//! A pipeline as the control store keeps it: its fields as JSON with every secret taken
//! out, and the secrets apart, for the store to encrypt. Secrets are a source's
//! `password`, `client_secret`, `refresh_token` and `api_key`, and a connection URL that
//! carries a password (the stored fields keep the URL with the password removed, so it can
//! be shown). Secrets under `oauth.` are state a source keeps between runs (a rotated
//! refresh token); registering the pipeline again keeps them.

use serde_json::{Map, Value};
use sluice_engine::control::PipelineChange;

use crate::error::{PipelineError, PipelineErrorKind};
use crate::spec::{PipelineSpec, SourceSpec};
use sluice_engine::control::StoredPipeline;

/// Fields of `[source]` that are secret whenever they are set.
const SECRET_FIELDS: &[&str] = &["password", "client_secret", "refresh_token", "api_key"];

impl PipelineSpec {
    /// Splits the pipeline into its shareable fields and its secrets (`source.<field>` ->
    /// value).
    pub fn to_stored(&self) -> (Value, Map<String, Value>) {
        let mut spec = serde_json::to_value(self).unwrap_or(Value::Null);
        let mut secrets = Map::new();
        if let Some(source) = spec.get_mut("source").and_then(Value::as_object_mut) {
            for field in SECRET_FIELDS {
                if let Some(v) = source.remove(*field)
                    && !v.is_null()
                {
                    secrets.insert(format!("source.{field}"), v);
                }
            }
            if let Some(Value::String(url)) = source.get("url") {
                let redacted = sluice_connectors::sql::redact_url(url);
                if redacted != *url {
                    secrets.insert("source.url".into(), Value::String(url.clone()));
                    source.insert("url".into(), Value::String(redacted));
                }
            }
        }
        (spec, secrets)
    }

    /// Puts a stored pipeline back together and checks it.
    pub fn from_stored(spec: &Value, secrets: &Map<String, Value>) -> Result<Self, PipelineError> {
        let mut spec = spec.clone();
        for (key, value) in secrets {
            let Some(field) = key.strip_prefix("source.") else {
                continue;
            };
            if let Some(source) = spec.get_mut("source").and_then(Value::as_object_mut) {
                source.insert(field.to_string(), value.clone());
            }
        }
        let spec: PipelineSpec = serde_json::from_value(spec).map_err(|e| {
            PipelineError::new(
                PipelineErrorKind::Config,
                format!("stored pipeline is not valid: {e}"),
            )
        })?;
        spec.check()?;
        Ok(spec)
    }
}

impl SourceSpec {
    /// Where the source's secrets are sent: for a database, its host, port, user and
    /// database; for a service, its URLs and account. A stored secret stays with a pipeline
    /// whose definition changes only while this stays the same.
    pub fn secret_destination(&self) -> Vec<String> {
        match self {
            SourceSpec::Csv(_) | SourceSpec::Xlsx(_) => Vec::new(),
            SourceSpec::Postgres(q) | SourceSpec::Mysql(q) => {
                sluice_connectors::sql::destination(&q.url)
                    .map_or_else(|| vec![q.url.clone()], |d| d.to_vec())
            }
            SourceSpec::Quickbooks(q) => vec![
                q.realm_id.clone(),
                q.client_id.clone(),
                q.base_url.clone().unwrap_or_default(),
                q.token_url.clone().unwrap_or_default(),
            ],
            SourceSpec::Odoo(o) => vec![o.url.clone(), o.db.clone(), o.login.clone()],
        }
    }
}

/// The fields and secrets to store when `spec` replaces `before`: the secrets the new
/// definition carries, and each stored one it leaves out, kept only while the source still points where that
/// secret was meant to go (otherwise the caller must send it again). A secret field the
/// body set to `null` (`cleared`) is removed. Rotated OAuth state (`oauth.`) follows the
/// same rule.
pub fn carry_secrets(
    before: &StoredPipeline,
    spec: &PipelineSpec,
    cleared: &[String],
) -> Result<(Value, Map<String, Value>), PipelineError> {
    let (fields, mut secrets) = spec.to_stored();
    let old = PipelineSpec::from_stored(&before.spec, &before.secrets)?;
    let same_place = old.source.secret_destination() == spec.source.secret_destination()
        && std::mem::discriminant(&old.source) == std::mem::discriminant(&spec.source);
    for (key, value) in &before.secrets {
        if secrets.contains_key(key) {
            continue;
        }
        let field = key.strip_prefix("source.").unwrap_or(key);
        if cleared.iter().any(|c| c == field) {
            continue;
        }
        if key == "source.url" {
            // The stored URL with its password; kept only for the same URL as shown.
            if fields["source"].get("url") == before.spec["source"].get("url") && same_place {
                secrets.insert(key.clone(), value.clone());
            }
            continue;
        }
        if key.starts_with("oauth.") {
            if same_place {
                secrets.insert(key.clone(), value.clone());
            }
            continue;
        }
        if !same_place {
            return Err(PipelineError::config(format!(
                "[source] now points somewhere else (host, port, user, database or account changed): send `{field}` again, or null to remove it"
            )));
        }
        secrets.insert(key.clone(), value.clone());
    }
    Ok((fields, secrets))
}

/// Stores `spec` under its tenant, keeping the `oauth.` state of the stored pipeline.
pub async fn register_pipeline<S: sluice_engine::control::PipelineStore>(
    store: &S,
    spec: &PipelineSpec,
) -> Result<(), PipelineError> {
    let tenant = sluice_engine::TenantSlug::parse(&spec.tenant)?;
    let (fields, mut secrets) = spec.to_stored();
    if let Some(before) = store.pipeline(&tenant, &spec.name).await? {
        for (k, v) in before.secrets {
            if k.starts_with("oauth.") {
                secrets.insert(k, v);
            }
        }
    }
    let change = PipelineChange::shell_register(
        serde_json::json!({ "secrets": secrets.keys().collect::<Vec<_>>() }),
    );
    store
        .save_pipeline(&tenant, &spec.name, &fields, &secrets, &change)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_leave_the_spec_and_come_back() {
        let spec = PipelineSpec::from_toml(
            r#"
            name = "erp"
            tenant = "acme"
            entity = "invoices"
            [source]
            kind = "postgres"
            url = "postgres://erp:hunter2@db:5432/erp"
            password = "s3cret"
            table = "invoices"
            "#,
        )
        .expect("valid");
        let (stored, secrets) = spec.to_stored();
        let text = stored.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        assert_eq!(stored["source"]["url"], "postgres://erp@db:5432/erp");
        assert_eq!(secrets.len(), 2);
        assert_eq!(
            PipelineSpec::from_stored(&stored, &secrets).expect("back"),
            spec
        );
    }

    #[test]
    fn a_file_pipeline_has_no_secrets() {
        let spec = PipelineSpec::from_toml(
            "name = \"f\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"csv\"\npath = \"a.csv\"\n[schedule]\ncron = \"*/5 * * * *\"\n",
        )
        .expect("valid");
        let (stored, secrets) = spec.to_stored();
        assert!(secrets.is_empty());
        assert_eq!(stored["schedule"]["cron"], "*/5 * * * *");
        assert_eq!(
            PipelineSpec::from_stored(&stored, &secrets).expect("back"),
            spec
        );
    }

    #[test]
    fn a_bad_cron_is_refused() {
        let err = PipelineSpec::from_toml(
            "name = \"f\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"csv\"\npath = \"a.csv\"\n[schedule]\ncron = \"every day\"\n",
        )
        .expect_err("bad cron");
        assert!(err.to_string().contains("cron"), "{err}");
    }
}
