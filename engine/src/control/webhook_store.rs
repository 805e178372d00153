//! Webhook endpoints and their deliveries, kept in the control store beside pipelines.
//!
//! An endpoint is a tenant's URL, the events it subscribes to and its signing secret
//! (sealed under the tenant's data key, like pipeline secrets, and re-sealed by a tenant
//! key rotation). An event recorded for a tenant becomes one delivery per subscribed
//! endpoint; a delivery's id is derived from the endpoint and the event's key, so an event
//! recorded twice (a job delivered twice) is one delivery, and a receiver sees the same
//! `webhook-id` on every attempt and can count each event once. Every attempt and the
//! answer it got is kept.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::webhooks::{EventType, WebhookSecret};
use crate::error::{EngineError, ErrorKind, Result};
use crate::tenant::TenantSlug;

/// A tenant's webhook endpoint (its secret is never part of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookEndpoint {
    /// `ep_` and 24 hex digits.
    #[schema(example = "ep_5f0c8a5e2b7d4c1a9e3f6b20")]
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// Where deliveries are POSTed.
    #[schema(example = "https://hooks.example.com/sluice")]
    pub url: String,
    /// The events it receives.
    pub events: Vec<EventType>,
    /// `run.quarantined` is sent for a run that set aside more rows than this.
    pub quarantine_threshold: u64,
    /// What the endpoint is for.
    pub description: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When its secret was last made or rotated.
    pub secret_rotated_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    /// Whether `event` goes to this endpoint.
    pub fn wants(&self, event: &WebhookEvent) -> bool {
        match event.only_endpoint.as_deref() {
            Some(only) => only == self.id,
            None => {
                self.events.contains(&event.event_type)
                    && (event.event_type != EventType::RunQuarantined
                        || event.quarantined > self.quarantine_threshold)
            }
        }
    }
}

/// An endpoint to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWebhookEndpoint {
    /// Where deliveries go (checked against the egress policy by the caller).
    pub url: String,
    /// The events it receives (at least one).
    pub events: Vec<EventType>,
    /// The `run.quarantined` threshold.
    pub quarantine_threshold: u64,
    /// What it is for.
    pub description: String,
}

impl NewWebhookEndpoint {
    /// Checks the parts a store cannot: events named, a URL of bounded length. (Naming
    /// `webhook.test` changes nothing: test sends go to the endpoint asked for anyway.)
    pub fn validate(&self) -> Result<()> {
        if self.events.is_empty() {
            return Err(EngineError::new(
                ErrorKind::Input,
                "an endpoint subscribes to at least one event",
            ));
        }
        if self.url.chars().count() > 2000 || self.description.chars().count() > 500 {
            return Err(EngineError::new(
                ErrorKind::Input,
                "the URL holds at most 2000 characters and the description 500",
            ));
        }
        Ok(())
    }
}

/// Something that happened, to be delivered to the endpoints that want it.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEvent {
    /// Names the event for good: the same happening recorded again has the same key
    /// (`run.succeeded:<run id>`), and so the same deliveries.
    pub key: String,
    /// Its type.
    pub event_type: EventType,
    /// Rows the run set aside (compared with each endpoint's threshold).
    pub quarantined: u64,
    /// What the event is about (a run, a dead letter), as the body's `data`.
    pub data: Value,
    /// Only this endpoint (a test send), whatever it subscribes to.
    pub only_endpoint: Option<String>,
}

impl WebhookEvent {
    /// An event of `event_type` about `subject` (a run id, a dead letter id).
    pub fn new(event_type: EventType, subject: &str, data: Value) -> Self {
        WebhookEvent {
            key: format!("{}:{subject}", event_type.as_str()),
            event_type,
            quarantined: 0,
            data,
            only_endpoint: None,
        }
    }

    /// The body every endpoint receives: `{"type", "timestamp", "data"}`, as the
    /// specification suggests.
    pub fn body(&self, at: DateTime<Utc>) -> Value {
        serde_json::json!({
            "type": self.event_type.as_str(),
            "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": self.data,
        })
    }

    /// The delivery id (the `webhook-id`) of this event at `endpoint`: the same for the
    /// same event and endpoint, whoever records it and however often.
    pub fn delivery_id(&self, endpoint: &str) -> String {
        let digest = Sha256::digest(format!("{endpoint}/{}", self.key).as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("msg_{hex}")
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not delivered yet; queued or between attempts.
    Pending,
    /// An attempt was answered 2xx.
    Delivered,
    /// Every attempt of the retry policy failed (replayable).
    Failed,
}

impl DeliveryStatus {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// From its stored form.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(DeliveryStatus::Pending),
            "delivered" => Ok(DeliveryStatus::Delivered),
            "failed" => Ok(DeliveryStatus::Failed),
            other => Err(EngineError::new(
                ErrorKind::Warehouse,
                format!("unknown delivery status {other:?}"),
            )),
        }
    }
}

/// One event for one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDelivery {
    /// The `webhook-id` header: `msg_` and 32 hex digits.
    #[schema(example = "msg_2f1c0d9e8b7a65432f1c0d9e8b7a6543")]
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// The endpoint.
    pub endpoint_id: String,
    /// The event's type.
    pub event_type: EventType,
    /// The event's key (`run.succeeded:<run id>`).
    pub event_key: String,
    /// The body sent, as sent.
    pub payload: Value,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made so far, over every replay.
    pub attempts: u32,
    /// When the event was recorded.
    pub created_at: DateTime<Utc>,
    /// When an attempt was last made (or the delivery last queued).
    pub updated_at: DateTime<Utc>,
    /// When an attempt was answered 2xx.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// One attempt at a delivery and the answer it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    /// The delivery.
    pub delivery_id: String,
    /// 1-based, over every replay of the delivery.
    pub number: u32,
    /// When it was sent.
    pub at: DateTime<Utc>,
    /// The HTTP status answered, if any.
    pub status_code: Option<u16>,
    /// The start of the answer's body (at most 1 KiB), or why there was no answer.
    pub response: String,
    /// How long the answer took.
    pub duration_ms: u64,
}

impl DeliveryAttempt {
    /// Whether the endpoint took the delivery (2xx).
    pub fn succeeded(&self) -> bool {
        self.status_code.is_some_and(|c| (200..300).contains(&c))
    }
}

/// The sealed secret's associated data: it opens only for its own tenant and endpoint.
pub(crate) fn webhook_secret_context(tenant: &TenantSlug, endpoint: &str) -> String {
    format!("{tenant}/webhook/{endpoint}")
}

/// A new endpoint id.
pub(crate) fn new_endpoint_id() -> String {
    format!("ep_{}", super::random_hex(12))
}

/// Where webhook endpoints and deliveries are kept.
pub trait WebhookStore: Send + Sync {
    /// Stores a new endpoint with a fresh secret (sealed under the tenant's data key);
    /// the secret is returned to be shown once.
    fn create_webhook(
        &self,
        tenant: &TenantSlug,
        new: &NewWebhookEndpoint,
    ) -> impl Future<Output = Result<(WebhookEndpoint, WebhookSecret)>> + Send;

    /// The tenant's endpoints, oldest first.
    fn webhooks(
        &self,
        tenant: &TenantSlug,
    ) -> impl Future<Output = Result<Vec<WebhookEndpoint>>> + Send;

    /// One endpoint with its secret opened (to sign with).
    fn webhook_signing(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<Option<(WebhookEndpoint, WebhookSecret)>>> + Send;

    /// Gives an endpoint a fresh secret, returned to be shown once; `None` when there is
    /// no such endpoint.
    fn rotate_webhook_secret(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<Option<WebhookSecret>>> + Send;

    /// Deletes an endpoint (its deliveries stay, for the record); false when there was none.
    fn delete_webhook(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Records `event` as one delivery per endpoint that wants it, in one transaction.
    /// Returns the ids of the event's deliveries that are still pending (made now, or by
    /// an earlier recording of the same event whose jobs may never have been queued).
    fn record_webhook_event(
        &self,
        tenant: &TenantSlug,
        event: &WebhookEvent,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// One delivery.
    fn webhook_delivery(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<Option<WebhookDelivery>>> + Send;

    /// An endpoint's deliveries, newest first, those recorded before the delivery
    /// `before` when given.
    fn webhook_deliveries(
        &self,
        tenant: &TenantSlug,
        endpoint: &str,
        before: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<WebhookDelivery>>> + Send;

    /// A delivery's attempts, first first.
    fn delivery_attempts(
        &self,
        tenant: &TenantSlug,
        delivery: &str,
    ) -> impl Future<Output = Result<Vec<DeliveryAttempt>>> + Send;

    /// Records an attempt and the status the delivery has after it, in one transaction;
    /// returns the attempt's number.
    fn record_delivery_attempt(
        &self,
        tenant: &TenantSlug,
        attempt: &DeliveryAttempt,
        status: DeliveryStatus,
    ) -> impl Future<Output = Result<u32>> + Send;

    /// Makes a delivery pending again (a replay); false when there is no such delivery.
    fn reopen_delivery(
        &self,
        tenant: &TenantSlug,
        id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Pending deliveries of every tenant untouched since `before` (their job was lost:
    /// a process died between recording and queueing), touched now so that the next
    /// sweep leaves them alone while they are queued again. `(tenant, delivery id)`.
    fn stale_deliveries(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(events: Vec<EventType>, threshold: u64) -> WebhookEndpoint {
        WebhookEndpoint {
            id: "ep_1".into(),
            tenant: "acme".into(),
            url: "https://example.com".into(),
            events,
            quarantine_threshold: threshold,
            description: String::new(),
            created_at: Utc::now(),
            secret_rotated_at: Utc::now(),
        }
    }

    #[test]
    fn an_endpoint_wants_its_events_and_quarantines_over_its_threshold() {
        let ep = endpoint(vec![EventType::RunSucceeded, EventType::RunQuarantined], 10);
        let ok = WebhookEvent::new(EventType::RunSucceeded, "r1", Value::Null);
        assert!(ep.wants(&ok));
        assert!(!ep.wants(&WebhookEvent::new(EventType::RunFailed, "r1", Value::Null)));
        let mut q = WebhookEvent::new(EventType::RunQuarantined, "r1", Value::Null);
        q.quarantined = 10;
        assert!(!ep.wants(&q), "10 is not more than the threshold of 10");
        q.quarantined = 11;
        assert!(ep.wants(&q));
        let mut test = WebhookEvent::new(EventType::WebhookTest, "t1", Value::Null);
        test.only_endpoint = Some("ep_2".into());
        assert!(!ep.wants(&test));
        test.only_endpoint = Some("ep_1".into());
        assert!(ep.wants(&test));
    }

    #[test]
    fn delivery_ids_are_the_same_for_the_same_event_and_endpoint() {
        let a = WebhookEvent::new(EventType::RunSucceeded, "r1", Value::Null);
        let b = WebhookEvent::new(EventType::RunSucceeded, "r1", serde_json::json!({"x": 1}));
        assert_eq!(a.delivery_id("ep_1"), b.delivery_id("ep_1"));
        assert_ne!(a.delivery_id("ep_1"), a.delivery_id("ep_2"));
        let c = WebhookEvent::new(EventType::RunFailed, "r1", Value::Null);
        assert_ne!(a.delivery_id("ep_1"), c.delivery_id("ep_1"));
        assert!(a.delivery_id("ep_1").starts_with("msg_"));
        assert_eq!(a.delivery_id("ep_1").len(), 36);
    }

    #[test]
    fn a_new_endpoint_needs_events_and_a_bounded_url() {
        let mut new = NewWebhookEndpoint {
            url: "https://example.com".into(),
            events: vec![],
            quarantine_threshold: 0,
            description: String::new(),
        };
        assert!(new.validate().is_err());
        new.events = vec![EventType::RunFailed];
        assert!(new.validate().is_ok());
        new.url = format!("https://example.com/{}", "a".repeat(2000));
        assert!(new.validate().is_err());
    }
}
