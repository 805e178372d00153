//! `/v1/webhooks`: a tenant's webhook endpoints (made, listed, rotated, deleted, sent a
//! test) and `/v1/webhook-deliveries`: each event sent to an endpoint, with every attempt
//! and the answer it got, replayable. A secret is in the answer once, when it is made or
//! rotated. An endpoint's URL must be one the server's egress policy lets tenants reach
//! (`--allow-source-hosts`), checked when it is saved and again on every send.

use axum::Json;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_engine::Store;
use sluice_engine::control::webhooks::EventType;
use sluice_engine::control::{
    DeliveryAttempt, NewWebhookEndpoint, PipelineOrigin, Role, WebhookDelivery, WebhookEndpoint,
    WebhookEvent,
};
use sluice_workers::webhooks::WebhookJob;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::routes::{Api, Page, Reply, audit, ok};
use crate::state::AppState;

/// Body of `POST /v1/webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhookBody {
    /// Where events are POSTed (http or https).
    #[schema(example = "https://hooks.example.com/sluice", max_length = 2000)]
    pub url: String,
    /// The events to receive; every event type when left out.
    pub events: Option<Vec<EventType>>,
    /// `run.quarantined` is sent for runs that set aside more rows than this (default 0).
    #[schema(minimum = 0, example = 100)]
    pub quarantine_threshold: Option<u64>,
    /// What the endpoint is for.
    #[schema(max_length = 500)]
    pub description: Option<String>,
}

/// A new endpoint and its secret (shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookCreated {
    /// The endpoint.
    pub endpoint: WebhookEndpoint,
    /// `whsec_...`: verify deliveries with it (Standard Webhooks); it is not shown again.
    pub secret: String,
}

/// A rotated secret (shown once); deliveries are signed with it from now on.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedSecret {
    /// `whsec_...`.
    pub secret: String,
}

/// The tenant's endpoints.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    /// Oldest first.
    pub items: Vec<WebhookEndpoint>,
}

/// A page of an endpoint's deliveries, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    /// The deliveries.
    pub items: Vec<WebhookDelivery>,
    /// The `cursor` of the next page; none on the last.
    pub next_cursor: Option<String>,
}

/// A delivery and every attempt at it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryDetail {
    /// The delivery.
    pub delivery: WebhookDelivery,
    /// Its attempts, first first, each with the answer it got.
    pub attempts: Vec<DeliveryAttempt>,
}

/// A delivery queued (202).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryQueued {
    /// The delivery (its `webhook-id`).
    pub delivery_id: String,
    /// Where to follow it.
    pub url: String,
}

fn queued(delivery_id: &str) -> Reply {
    Ok((
        StatusCode::ACCEPTED,
        Json(DeliveryQueued {
            delivery_id: delivery_id.to_string(),
            url: format!("/v1/webhook-deliveries/{delivery_id}"),
        }),
    )
        .into_response())
}

/// The tenant's endpoint `id`, or 404.
pub async fn endpoint<W: Store>(
    s: &AppState<W>,
    tenant: &sluice_engine::TenantSlug,
    id: &str,
) -> Result<WebhookEndpoint, ApiError> {
    s.warehouse
        .webhooks(tenant)
        .await?
        .into_iter()
        .find(|e| e.id == id)
        .ok_or_else(|| ApiError::not_found(format!("webhook endpoint {id}")))
}

/// `GET /v1/webhooks`
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "webhooks",
    summary = "List webhook endpoints",
    security(("bearer" = ["operator"])),
    responses((status = 200, description = "The endpoints (never their secrets)", body = WebhookList))
)]
pub async fn list_webhooks<W: Store>(axum::extract::State(s): Api<W>, caller: Caller) -> Reply {
    let tenant = caller.tenant_with(Role::Operator)?;
    ok(WebhookList {
        items: s.warehouse.webhooks(tenant).await?,
    })
}

/// `POST /v1/webhooks`: the secret is in the answer, once.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "webhooks",
    summary = "Make a webhook endpoint: 201 with its secret, shown once",
    security(("bearer" = ["admin"])),
    request_body = NewWebhookBody,
    responses((status = 201, description = "Made", body = WebhookCreated))
)]
pub async fn create_webhook<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Json(body): Json<NewWebhookBody>,
) -> Reply {
    let made = make_webhook(&s, &caller, body).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

/// Makes an endpoint as `caller` may (its URL checked against the egress policy,
/// audited); the secret is in the answer, once. The console's form comes here too.
pub async fn make_webhook<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    body: NewWebhookBody,
) -> Result<WebhookCreated, ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    s.confinement
        .reach(tenant.as_str(), PipelineOrigin::Api)
        .egress()
        .check_url(&body.url)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let new = NewWebhookEndpoint {
        url: body.url,
        events: body.events.unwrap_or_else(|| EventType::ALL.to_vec()),
        quarantine_threshold: body.quarantine_threshold.unwrap_or(0),
        description: body.description.unwrap_or_default(),
    };
    let (endpoint, secret) = s.warehouse.create_webhook(tenant, &new).await?;
    audit(
        s,
        caller,
        "webhook.create",
        &endpoint.id,
        json!({ "url": endpoint.url, "events": endpoint.events }),
    )
    .await?;
    Ok(WebhookCreated {
        endpoint,
        secret: secret.reveal(),
    })
}

/// `GET /v1/webhooks/{id}`
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "A webhook endpoint",
    security(("bearer" = ["operator"])),
    params(("id" = String, Path, description = "The endpoint's id")),
    responses((status = 200, description = "The endpoint", body = WebhookEndpoint))
)]
pub async fn get_webhook<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Operator)?;
    ok(endpoint(&s, tenant, &id).await?)
}

/// `DELETE /v1/webhooks/{id}`: no more deliveries; those made stay listed.
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "Delete a webhook endpoint",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The endpoint's id")),
    responses((status = 204, description = "Deleted"))
)]
pub async fn delete_webhook<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
) -> Reply {
    remove_webhook(&s, &caller, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Deletes an endpoint (audited).
pub async fn remove_webhook<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    id: &str,
) -> Result<(), ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    if !s.warehouse.delete_webhook(tenant, id).await? {
        return Err(ApiError::not_found(format!("webhook endpoint {id}")));
    }
    audit(s, caller, "webhook.delete", id, json!({})).await
}

/// `POST /v1/webhooks/{id}/rotate-secret`: the new secret is in the answer, once.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/rotate-secret",
    tag = "webhooks",
    summary = "Give an endpoint a new secret, shown once",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The endpoint's id")),
    responses((status = 200, description = "The new secret", body = RotatedSecret))
)]
pub async fn rotate_webhook_secret<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
) -> Reply {
    ok(RotatedSecret {
        secret: rotate_secret(&s, &caller, &id).await?,
    })
}

/// Gives an endpoint a new secret (audited); the secret, to show once.
pub async fn rotate_secret<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    id: &str,
) -> Result<String, ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    let secret = s
        .warehouse
        .rotate_webhook_secret(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook endpoint {id}")))?;
    audit(s, caller, "webhook.rotate_secret", id, json!({})).await?;
    Ok(secret.reveal())
}

/// `POST /v1/webhooks/{id}/test`: a `webhook.test` event to this endpoint only, through
/// the queue like any other.
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/test",
    tag = "webhooks",
    summary = "Send the endpoint a webhook.test event: 202",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The endpoint's id")),
    responses((status = 202, description = "Queued", body = DeliveryQueued))
)]
pub async fn test_webhook<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
) -> Reply {
    queued(&send_test(&s, &caller, &id, request_id).await?)
}

/// Queues a `webhook.test` event to endpoint `id` only; the delivery's id.
pub async fn send_test<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    id: &str,
    request_id: String,
) -> Result<String, ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    let target = endpoint(s, tenant, id).await?;
    let test_id = uuid::Uuid::now_v7().to_string();
    let mut event = WebhookEvent::new(
        EventType::WebhookTest,
        &test_id,
        json!({
            "id": test_id,
            "endpoint_id": target.id,
            "requested_by": caller.key_id,
            "message": "a test delivery from sluice",
        }),
    );
    event.only_endpoint = Some(target.id.clone());
    let ids = s
        .queues
        .emit(&*s.warehouse, tenant, &event, &request_id)
        .await?;
    ids.into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("webhook endpoint {id}")))
}

/// `GET /v1/webhooks/{id}/deliveries`: newest first, paged by cursor.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    tag = "webhooks",
    summary = "An endpoint's deliveries",
    security(("bearer" = ["operator"])),
    params(("id" = String, Path, description = "The endpoint's id"), Page),
    responses((status = 200, description = "A page of deliveries", body = DeliveryPage))
)]
pub async fn list_deliveries<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Operator)?;
    let limit = page.limit.unwrap_or(50).clamp(1, 1000);
    let mut items = s
        .warehouse
        .webhook_deliveries(tenant, &id, page.cursor.as_deref(), limit + 1)
        .await?;
    if items.is_empty() && page.cursor.is_none() {
        // An endpoint with no deliveries yet, or none at all.
        endpoint(&s, tenant, &id).await?;
    }
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = more.then(|| items.last().map(|d| d.id.clone())).flatten();
    ok(DeliveryPage { items, next_cursor })
}

/// `GET /v1/webhook-deliveries/{id}`
#[utoipa::path(
    get,
    path = "/v1/webhook-deliveries/{id}",
    tag = "webhooks",
    summary = "A delivery with every attempt and its answer",
    security(("bearer" = ["operator"])),
    params(("id" = String, Path, description = "The delivery's id (its webhook-id)")),
    responses((status = 200, description = "The delivery", body = DeliveryDetail))
)]
pub async fn get_delivery<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
) -> Reply {
    let tenant = caller.tenant_with(Role::Operator)?;
    let delivery = s
        .warehouse
        .webhook_delivery(tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook delivery {id}")))?;
    let attempts = s.warehouse.delivery_attempts(tenant, &id).await?;
    ok(DeliveryDetail { delivery, attempts })
}

/// `POST /v1/webhook-deliveries/{id}/replay`: sends it again (the same `webhook-id`, so a
/// receiver that has it already can tell), under the retry policy.
#[utoipa::path(
    post,
    path = "/v1/webhook-deliveries/{id}/replay",
    tag = "webhooks",
    summary = "Send a delivery again: 202",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The delivery's id (its webhook-id)")),
    responses((status = 202, description = "Queued", body = DeliveryQueued))
)]
pub async fn replay_delivery<W: Store>(
    axum::extract::State(s): Api<W>,
    caller: Caller,
    Path(id): Path<String>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
) -> Reply {
    resend(&s, &caller, &id, request_id).await?;
    queued(&id)
}

/// Sends delivery `id` again under the retry policy (audited).
pub async fn resend<W: Store>(
    s: &AppState<W>,
    caller: &Caller,
    id: &str,
    request_id: String,
) -> Result<(), ApiError> {
    let tenant = caller.tenant_with(Role::Admin)?;
    if !s.warehouse.reopen_delivery(tenant, id).await? {
        return Err(ApiError::not_found(format!("webhook delivery {id}")));
    }
    s.queues
        .push_webhook(WebhookJob {
            tenant: tenant.to_string(),
            delivery_id: id.to_string(),
            correlation_id: request_id,
        })
        .await?;
    audit(s, caller, "webhook.replay", id, json!({})).await
}
