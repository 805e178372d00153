//! Stored rows read back into the engine's types, once for both backends. A backend says
//! how it reads a column ([`StoredRow`]: PostgreSQL has native instants and JSON, SQLite
//! keeps both as text); what a run ledger, a quarantined row, a dead letter or an API key
//! is made of is stated here only.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use crate::control::webhooks::{EventType, WebhookSecret};
use crate::control::{
    ApiKeyRecord, DeadLetter, DeliveryAttempt, DeliveryStatus, Role, WebhookDelivery,
    WebhookEndpoint,
};
use crate::control::{no_master_key, webhook_secret_context};
use crate::error::{EngineError, ErrorKind, Result};
use crate::ledger::{RowCounts, RunLedger, RunStatus, RunTrigger};
use crate::quarantine::{QuarantineStatus, QuarantinedRow, SourcePosition};
use crate::secrets::MasterKey;
use crate::tenant::TenantSlug;

/// How a backend reads the columns the shared decoders need.
pub(crate) trait StoredRow {
    /// The column holding a quarantined row's raw values as JSON text (key order kept).
    const RAW_TEXT: &'static str;

    /// A column of type `T` that both backends store natively (text, integers).
    fn value<T>(&self, col: &str) -> Result<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>
            + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>;

    /// An instant column that may be NULL.
    fn instant(&self, col: &str) -> Result<Option<DateTime<Utc>>>;

    /// A JSON column.
    fn json(&self, col: &str) -> Result<Value>;

    /// An instant column that is never NULL.
    fn required_instant(&self, col: &str) -> Result<DateTime<Utc>> {
        self.instant(col)?
            .ok_or_else(|| EngineError::new(ErrorKind::Warehouse, format!("{col} is missing")))
    }

    /// A count column (stored as a signed 64-bit integer).
    fn count(&self, col: &str) -> Result<u64> {
        let n: i64 = self.value(col)?;
        u64::try_from(n).map_err(|_| {
            EngineError::new(
                ErrorKind::Warehouse,
                format!("{col} holds a negative count {n}"),
            )
        })
    }
}

fn read_error(col: &str, e: sqlx::Error) -> EngineError {
    EngineError::from_sqlx(format!("reading column {col}"), e)
}

impl StoredRow for PgRow {
    const RAW_TEXT: &'static str = "raw_text";

    fn value<T>(&self, col: &str) -> Result<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>
            + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>,
    {
        self.try_get(col).map_err(|e| read_error(col, e))
    }

    fn instant(&self, col: &str) -> Result<Option<DateTime<Utc>>> {
        self.try_get(col).map_err(|e| read_error(col, e))
    }

    fn json(&self, col: &str) -> Result<Value> {
        let value: sqlx::types::Json<Value> = self.try_get(col).map_err(|e| read_error(col, e))?;
        Ok(value.0)
    }
}

impl StoredRow for SqliteRow {
    const RAW_TEXT: &'static str = "raw";

    fn value<T>(&self, col: &str) -> Result<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>
            + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>,
    {
        self.try_get(col).map_err(|e| read_error(col, e))
    }

    fn instant(&self, col: &str) -> Result<Option<DateTime<Utc>>> {
        let text: Option<String> = self.try_get(col).map_err(|e| read_error(col, e))?;
        text.map(|t| parse_instant(&t)).transpose()
    }

    fn json(&self, col: &str) -> Result<Value> {
        let text: String = self.try_get(col).map_err(|e| read_error(col, e))?;
        serde_json::from_str(&text).map_err(|e| {
            EngineError::new(ErrorKind::Warehouse, format!("{col} is not JSON")).with_source(e)
        })
    }
}

/// An RFC 3339 instant as SQLite stores them.
pub(crate) fn parse_instant(text: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| {
            EngineError::new(
                ErrorKind::Warehouse,
                format!("not an RFC 3339 instant: {text:?}"),
            )
            .with_source(e)
        })
}

/// A run's ledger.
pub(crate) fn ledger_from_row(tenant: &TenantSlug, r: &impl StoredRow) -> Result<RunLedger> {
    let status: String = r.value("status")?;
    let trigger: String = r.value("trigger")?;
    Ok(RunLedger {
        run_id: r.value("run_id")?,
        tenant: tenant.to_string(),
        pipeline: r.value("pipeline")?,
        entity: r.value("entity")?,
        trigger: RunTrigger::parse(&trigger).ok_or_else(|| {
            EngineError::new(
                ErrorKind::Warehouse,
                format!("unknown run trigger {trigger}"),
            )
        })?,
        started_at: r.required_instant("started_at")?,
        finished_at: r.instant("finished_at")?,
        status: RunStatus::parse(&status).ok_or_else(|| {
            EngineError::new(ErrorKind::Warehouse, format!("unknown run status {status}"))
        })?,
        counts: RowCounts {
            rows_read: r.count("rows_read")?,
            inserted: r.count("inserted")?,
            updated: r.count("updated")?,
            unchanged: r.count("unchanged")?,
            quarantined: r.count("quarantined")?,
            deduplicated: r.count("deduplicated")?,
        },
        rules_hash: r.value("rules_hash")?,
        error: r.value("error")?,
    })
}

/// A quarantined row.
pub(crate) fn quarantined_from_row<R: StoredRow>(
    tenant: &TenantSlug,
    r: &R,
) -> Result<QuarantinedRow> {
    let status: String = r.value("status")?;
    let raw: String = r.value(R::RAW_TEXT)?;
    let bad = |what: &str| {
        EngineError::new(
            ErrorKind::Warehouse,
            format!("quarantine row has bad {what}"),
        )
    };
    Ok(QuarantinedRow {
        id: r.value("id")?,
        tenant: tenant.to_string(),
        run_id: r.value("run_id")?,
        pipeline: r.value("pipeline")?,
        entity: r.value("entity")?,
        status: QuarantineStatus::parse(&status).ok_or_else(|| bad("status"))?,
        position: SourcePosition {
            location: r.value("location")?,
            sheet: r.value("sheet")?,
            row: r.count("source_row")?,
        },
        raw: serde_json::from_str(&raw).map_err(|e| bad("raw").with_source(e))?,
        errors: serde_json::from_value(r.json("errors")?)
            .map_err(|e| bad("errors").with_source(e))?,
        created_at: r.required_instant("created_at")?,
    })
}

/// A dead letter.
pub(crate) fn dead_letter_from_row(tenant: &TenantSlug, r: &impl StoredRow) -> Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.value("id")?,
        tenant: tenant.to_string(),
        pipeline: r.value("pipeline")?,
        job_kind: r.value("job_kind")?,
        job: r.json("job")?,
        attempts: r.json("attempts")?,
        reason: r.value("reason")?,
        created_at: r.required_instant("created_at")?,
        replayed_at: r.instant("replayed_at")?,
        replay_run: r.value("replay_run")?,
    })
}

/// An API key (its hash, never the key).
pub(crate) fn key_from_row(r: &impl StoredRow) -> Result<ApiKeyRecord> {
    let role: String = r.value("role")?;
    Ok(ApiKeyRecord {
        id: r.value("id")?,
        prefix: r.value("prefix")?,
        hash: r.value("hash")?,
        tenant: r.value("tenant")?,
        role: Role::parse(&role).ok_or_else(|| {
            EngineError::new(ErrorKind::Warehouse, format!("unknown role {role:?}"))
        })?,
        name: r.value("name")?,
        created_at: r.required_instant("created_at")?,
        revoked_at: r.instant("revoked_at")?,
    })
}

/// A webhook endpoint (no secret).
pub(crate) fn endpoint_from_row<R: StoredRow>(r: &R) -> Result<WebhookEndpoint> {
    let events = serde_json::from_value(r.json("events")?).map_err(|e| {
        EngineError::new(ErrorKind::Warehouse, "events is not a list of event types").with_source(e)
    })?;
    Ok(WebhookEndpoint {
        id: r.value("id")?,
        tenant: r.value("tenant")?,
        url: r.value("url")?,
        events,
        quarantine_threshold: r.count("quarantine_threshold")?,
        description: r.value("description")?,
        created_at: r.required_instant("created_at")?,
        secret_rotated_at: r.required_instant("secret_rotated_at")?,
    })
}

/// A webhook delivery.
pub(crate) fn delivery_from_row<R: StoredRow>(r: &R) -> Result<WebhookDelivery> {
    let event_type: String = r.value("event_type")?;
    let payload: String = r.value("payload")?;
    Ok(WebhookDelivery {
        id: r.value("id")?,
        tenant: r.value("tenant")?,
        endpoint_id: r.value("endpoint_id")?,
        event_type: EventType::parse(&event_type).ok_or_else(|| {
            EngineError::new(
                ErrorKind::Warehouse,
                format!("unknown event type {event_type:?}"),
            )
        })?,
        event_key: r.value("event_key")?,
        payload: serde_json::from_str(&payload).map_err(|e| {
            EngineError::new(ErrorKind::Warehouse, "a delivery's payload is not JSON")
                .with_source(e)
        })?,
        status: DeliveryStatus::parse(&r.value::<String>("status")?)?,
        attempts: u32::try_from(r.count("attempts")?).unwrap_or(u32::MAX),
        created_at: r.required_instant("created_at")?,
        updated_at: r.required_instant("updated_at")?,
        delivered_at: r.instant("delivered_at")?,
    })
}

/// One attempt at a webhook delivery.
pub(crate) fn attempt_from_row<R: StoredRow>(r: &R) -> Result<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        delivery_id: r.value("delivery_id")?,
        number: u32::try_from(r.count("number")?).unwrap_or(u32::MAX),
        at: r.required_instant("at")?,
        status_code: r
            .value::<Option<i64>>("status_code")?
            .and_then(|c| u16::try_from(c).ok()),
        response: r.value("response")?,
        duration_ms: r.count("duration_ms")?,
    })
}

/// An endpoint and its secret, from a row holding the endpoint's columns, its sealed
/// `secret` and the tenant's `wrapped_key`, opened with `master`.
pub(crate) fn signing_from_row<R: StoredRow>(
    r: &R,
    master: Option<&MasterKey>,
    tenant: &TenantSlug,
) -> Result<(WebhookEndpoint, WebhookSecret)> {
    let endpoint = endpoint_from_row(r)?;
    let master = master.ok_or_else(no_master_key)?;
    let wrapped: Option<Vec<u8>> = r.value("wrapped_key")?;
    let wrapped = wrapped.ok_or_else(|| {
        EngineError::new(
            ErrorKind::Warehouse,
            format!("tenant '{tenant}' has a webhook secret but no data key"),
        )
    })?;
    let key = master.unwrap_key(&wrapped, tenant.as_str())?;
    let sealed: Vec<u8> = r.value("secret")?;
    let plain =
        zeroize::Zeroizing::new(key.open(&sealed, &webhook_secret_context(tenant, &endpoint.id))?);
    Ok((endpoint, WebhookSecret::from_key(&plain)?))
}
