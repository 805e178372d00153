//! A pipeline as the control store keeps it: its fields as JSON with every secret taken
//! out, and the secrets apart, for the store to encrypt. Secrets are a source's
//! `password`, `client_secret`, `refresh_token` and `api_key`, and a connection URL that
//! carries a password (the stored fields keep the URL with the password removed, so it can
//! be shown). Secrets under `oauth.` are state a source keeps between runs (a rotated
//! refresh token); registering the pipeline again keeps them.

use serde_json::{Map, Value};

use crate::error::{PipelineError, PipelineErrorKind};
use crate::spec::PipelineSpec;

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
    store
        .save_pipeline(&tenant, &spec.name, &fields, &secrets)
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
