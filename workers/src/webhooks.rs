//! Webhook deliveries through the job queue. When a job ends, its events are recorded as
//! deliveries (one per subscribed endpoint, in the control store) and a job per delivery
//! goes on the webhook queue; a worker POSTs the event, signed as Standard Webhooks says,
//! under the retry policy (any answer but 2xx, or none, is retried), and records every
//! attempt with the answer it got. Delivery is at least once: a receiver counts each event
//! once by its `webhook-id`, which is the same on every attempt and replay.
//!
//! A delivery whose job was lost (the process died between recording it and queueing the
//! job) stays pending; the sweep queues it again once it has been untouched for
//! [`STALE_AFTER`].

use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sluice_connectors::egress::EgressPolicy;
use sluice_engine::TenantSlug;
use sluice_engine::control::webhooks::WebhookSecret;
use sluice_engine::control::{
    DeliveryAttempt, DeliveryStatus, WebhookDelivery, WebhookEvent, WebhookStore,
};

use crate::error::{WorkerError, WorkerErrorKind};
use crate::metrics::metrics;
use crate::queue::{QueueName, Queues, with_backoff};
use crate::retry::{Outcome, RetryPolicy, continue_with_retries};

/// Deliver one event to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookJob {
    /// The tenant.
    pub tenant: String,
    /// The delivery (its id is the `webhook-id`).
    pub delivery_id: String,
    /// Follows the work through logs.
    pub correlation_id: String,
}

/// How long one attempt waits for the endpoint's answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// A pending delivery untouched this long has lost its job and is queued again.
pub const STALE_AFTER: Duration = Duration::from_secs(300);

/// The most of an answer's body kept with the attempt.
const RESPONSE_KEPT: usize = 1024;

impl Queues {
    /// Puts a delivery's job on the webhook queue.
    pub async fn push_webhook(&self, job: WebhookJob) -> Result<(), WorkerError> {
        use apalis::prelude::TaskSink;
        let failed = |e: String| {
            WorkerError::new(
                WorkerErrorKind::Queue,
                format!("queueing the webhook delivery: {e}"),
            )
        };
        if let Some(mut storage) = self.redis_storage::<WebhookJob>(QueueName::Webhook) {
            storage.push(job).await.map_err(|e| failed(e.to_string()))?;
        } else if let Some(mut storage) = self.sqlite_storage::<WebhookJob>(QueueName::Webhook) {
            storage.push(job).await.map_err(|e| failed(e.to_string()))?;
        }
        Ok(())
    }

    /// Records `event` for the tenant's endpoints that want it and queues a job for each
    /// of its pending deliveries; returns their ids. Recording is retried for about a
    /// minute (a warehouse restarting); a delivery recorded but not queued is queued by the
    /// sweep.
    pub async fn emit<S: WebhookStore>(
        &self,
        store: &S,
        tenant: &TenantSlug,
        event: &WebhookEvent,
        correlation_id: &str,
    ) -> Result<Vec<String>, WorkerError> {
        let ids = with_backoff("recording a webhook event", || async {
            store
                .record_webhook_event(tenant, event)
                .await
                .map_err(|e| {
                    WorkerError::new(WorkerErrorKind::Queue, "recording a webhook event")
                        .with_source(e)
                })
        })
        .await?;
        for id in &ids {
            let job = WebhookJob {
                tenant: tenant.to_string(),
                delivery_id: id.clone(),
                correlation_id: correlation_id.to_string(),
            };
            with_backoff("queueing a webhook delivery", || {
                self.push_webhook(job.clone())
            })
            .await?;
            tracing::info!(%tenant, delivery = %id, event = %event.key, "webhook delivery queued");
        }
        Ok(ids)
    }

    /// Queues again the pending deliveries untouched for `stale_after` (their jobs were
    /// lost; the workers sweep with [`STALE_AFTER`]); returns how many.
    pub async fn sweep_deliveries<S: WebhookStore>(
        &self,
        store: &S,
        stale_after: Duration,
    ) -> Result<usize, WorkerError> {
        let before = Utc::now()
            - chrono::Duration::from_std(stale_after).unwrap_or(chrono::Duration::minutes(5));
        let stale = store.stale_deliveries(before, 100).await.map_err(|e| {
            WorkerError::new(WorkerErrorKind::Queue, "finding lost deliveries").with_source(e)
        })?;
        for (tenant, delivery_id) in &stale {
            tracing::warn!(%tenant, delivery = %delivery_id, "a pending webhook delivery had no job; queued again");
            self.push_webhook(WebhookJob {
                tenant: tenant.clone(),
                delivery_id: delivery_id.clone(),
                correlation_id: uuid::Uuid::now_v7().to_string(),
            })
            .await?;
        }
        Ok(stale.len())
    }
}

/// Why an attempt failed.
#[derive(Debug)]
struct AttemptFailed {
    message: String,
    /// False for what no retry mends (the endpoint's host is refused by the egress policy).
    transient: bool,
}

impl std::fmt::Display for AttemptFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs one delivery job to its end: every attempt the retry policy allows until the
/// endpoint answers 2xx, each recorded with its answer. A delivery no longer pending
/// (delivered, or failed and not replayed) is left alone. Returns how it stands after.
pub async fn deliver<S: WebhookStore>(
    store: &S,
    egress: &EgressPolicy,
    policy: &RetryPolicy,
    job: &WebhookJob,
) -> Result<DeliveryStatus, WorkerError> {
    let tenant = TenantSlug::parse(&job.tenant)
        .map_err(|e| WorkerError::new(WorkerErrorKind::Job, "the job's tenant").with_source(e))?;
    let store_error = |what: &'static str| {
        move |e: sluice_engine::EngineError| {
            WorkerError::new(WorkerErrorKind::Queue, what).with_source(e)
        }
    };
    let delivery = store
        .webhook_delivery(&tenant, &job.delivery_id)
        .await
        .map_err(store_error("reading the delivery"))?
        .ok_or_else(|| {
            WorkerError::new(
                WorkerErrorKind::NotFound,
                format!("no webhook delivery {}", job.delivery_id),
            )
        })?;
    if delivery.status != DeliveryStatus::Pending {
        return Ok(delivery.status);
    }
    let signing = store
        .webhook_signing(&tenant, &delivery.endpoint_id)
        .await
        .map_err(store_error("reading the endpoint"))?;
    let Some((endpoint, secret)) = signing else {
        let attempt = DeliveryAttempt {
            delivery_id: delivery.id.clone(),
            number: 0,
            at: Utc::now(),
            status_code: None,
            response: "the endpoint was deleted; nothing was sent".into(),
            duration_ms: 0,
        };
        store
            .record_delivery_attempt(&tenant, &attempt, DeliveryStatus::Failed)
            .await
            .map_err(store_error("recording the attempt"))?;
        return Ok(DeliveryStatus::Failed);
    };
    let client = egress
        .http_client()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(ATTEMPT_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("sluice-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            WorkerError::new(WorkerErrorKind::Queue, "building the HTTP client").with_source(e)
        })?;
    let body = delivery.payload.to_string();
    let allowed = policy.attempts.max(1) as u32;
    let (outcome, _) = continue_with_retries(
        policy,
        Vec::new(),
        |n| {
            let (client, endpoint, secret, body, delivery) =
                (&client, &endpoint, &secret, &body, &delivery);
            let tenant = &tenant;
            async move {
                let checked = egress.check_url(&endpoint.url);
                let attempt = match &checked {
                    Ok(()) => send_once(client, &endpoint.url, secret, delivery, body).await,
                    Err(e) => DeliveryAttempt {
                        delivery_id: delivery.id.clone(),
                        number: 0,
                        at: Utc::now(),
                        status_code: None,
                        response: e.to_string(),
                        duration_ms: 0,
                    },
                };
                let status = if attempt.succeeded() {
                    DeliveryStatus::Delivered
                } else if n >= allowed || checked.is_err() {
                    DeliveryStatus::Failed
                } else {
                    DeliveryStatus::Pending
                };
                let number = store
                    .record_delivery_attempt(tenant, &attempt, status)
                    .await
                    .map_err(|e| AttemptFailed {
                        message: format!("recording the attempt: {e}"),
                        transient: true,
                    })?;
                let outcome = match (attempt.status_code, status) {
                    (_, DeliveryStatus::Delivered) => "delivered",
                    (Some(_), _) => "refused",
                    (None, _) => "unreachable",
                };
                metrics()
                    .webhook_attempts
                    .with_label_values(&[outcome])
                    .inc();
                tracing::info!(
                    %tenant,
                    delivery = %delivery.id,
                    endpoint = %endpoint.id,
                    event = delivery.event_type.as_str(),
                    attempt = number,
                    status_code = attempt.status_code,
                    duration_ms = attempt.duration_ms,
                    response = %attempt.response,
                    "webhook attempt"
                );
                if attempt.succeeded() {
                    Ok(())
                } else {
                    Err(AttemptFailed {
                        message: match attempt.status_code {
                            Some(code) => format!("the endpoint answered {code}"),
                            None => attempt.response.clone(),
                        },
                        transient: checked.is_ok(),
                    })
                }
            }
        },
        |e: &AttemptFailed| e.transient,
    )
    .await;
    match outcome {
        Outcome::Succeeded { .. } => Ok(DeliveryStatus::Delivered),
        Outcome::Dead { reason, .. } => {
            metrics().webhook_deliveries_failed.inc();
            tracing::error!(%tenant, delivery = %delivery.id, endpoint = %endpoint.id, %reason, "webhook delivery failed; replay it once the endpoint is mended");
            Ok(DeliveryStatus::Failed)
        }
    }
}

/// One POST of the delivery, signed now; what the endpoint answered (or why it did not).
async fn send_once(
    client: &reqwest::Client,
    url: &str,
    secret: &WebhookSecret,
    delivery: &WebhookDelivery,
    body: &str,
) -> DeliveryAttempt {
    let at = Utc::now();
    let timestamp = at.timestamp();
    let started = Instant::now();
    let sent = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &delivery.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            secret.sign(&delivery.id, timestamp, body.as_bytes()),
        )
        .body(body.to_string())
        .send()
        .await;
    let (status_code, response) = match sent {
        Ok(answer) => {
            let code = answer.status().as_u16();
            let text = answer.text().await.unwrap_or_default();
            (Some(code), excerpt(&text))
        }
        Err(e) => (None, describe(&e)),
    };
    DeliveryAttempt {
        delivery_id: delivery.id.clone(),
        number: 0,
        at,
        status_code,
        response,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// The start of an answer's body, cut at a character boundary.
fn excerpt(text: &str) -> String {
    if text.len() <= RESPONSE_KEPT {
        return text.to_string();
    }
    let mut end = RESPONSE_KEPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A transport error with its causes (reqwest's own message says only "error sending
/// request").
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    excerpt(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_kept_to_a_kibibyte_at_a_character_boundary() {
        assert_eq!(excerpt("ok"), "ok");
        let long = "é".repeat(1000);
        let cut = excerpt(&long);
        assert!(cut.len() <= RESPONSE_KEPT + "…".len());
        assert!(cut.ends_with('…'));
    }
}
