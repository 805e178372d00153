//! Webhooks: the tenant's endpoints (make one: its secret is shown once), and each
//! endpoint's deliveries with their last answer; send a test, rotate the secret (shown
//! once), delete, replay a delivery. Every action goes through the API's own functions.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use maud::{Markup, html};
use serde::Deserialize;
use sluice_engine::Store;
use sluice_engine::control::webhooks::EventType;
use sluice_engine::control::{DeliveryStatus, WebhookEndpoint};

use crate::console::session::SignedIn;
use crate::console::{
    PageError, PageResult, csrf_field, form_pairs, form_value, layout, may, url_encode, when,
};
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;
use crate::webhooks::{
    NewWebhookBody, endpoint, make_webhook, remove_webhook, resend, rotate_secret, send_test,
};

/// Query of the webhook pages.
#[derive(Debug, Deserialize)]
pub struct NoticeQuery {
    notice: Option<String>,
}

/// The secret, once, with what to do with it.
fn secret_notice(secret: &str) -> Markup {
    html! {
        div class="notice" role="status" {
            p { strong { "The endpoint's signing secret. Copy it now: it is shown once and never again." } }
            p { input class="mono secret" readonly value=(secret) aria-label="The signing secret" size="60"; }
            p class="small muted" { "Verify each delivery's webhook-signature with it (Standard Webhooks: HMAC-SHA256 of id.timestamp.body)." }
        }
    }
}

fn list_page(
    user: &SignedIn,
    endpoints: &[WebhookEndpoint],
    secret: Option<&str>,
    notice: Option<&str>,
) -> axum::response::Response {
    let body = html! {
        h1 { "Webhooks" }
        p class="muted" { "Sluice POSTs events to these URLs, signed, and tries again (5 attempts) until they answer 2xx." }
        @if let Some(secret) = secret { (secret_notice(secret)) }
        @if endpoints.is_empty() { p class="empty" { "No endpoints yet." } }
        @else {
            div class="table-wrap" {
            table class="data" {
                thead { tr { th scope="col" { "URL" } th scope="col" { "Events" } th scope="col" class="num" { "Quarantine over" } th scope="col" { "Description" } th scope="col" { "Made" } } }
                tbody {
                    @for e in endpoints {
                        tr {
                            td { a class="mono" href={ "/webhooks/" (url_encode(&e.id)) } { (e.url) } }
                            td class="small" { @for (i, t) in e.events.iter().enumerate() { @if i > 0 { ", " } span class="rule" { (t.as_str()) } } }
                            td class="num" { (e.quarantine_threshold) }
                            td { (e.description) }
                            td class="small" { (when(&e.created_at)) }
                        }
                    }
                }
            }
            }
        }
        @if may(user, "post", "/webhooks") {
            h2 { "New endpoint" }
            form method="post" action="/webhooks" class="stack" {
                (csrf_field(user))
                label { "URL " input name="url" type="url" required placeholder="https://hooks.example.com/sluice" size="60"; }
                fieldset {
                    legend { "Events" }
                    @for t in EventType::ALL {
                        label { input type="checkbox" name="event" value=(t.as_str()) checked; " " (t.as_str()) }
                    }
                }
                label { "Send run.quarantined for runs that set aside more than " input name="quarantine_threshold" type="number" min="0" value="0"; " rows" }
                label { "Description " input name="description" placeholder="e.g. ops alerts channel"; }
                button type="submit" class="primary" { "Make endpoint" }
            }
        }
    };
    layout(user, "Webhooks", "/webhooks", notice, body)
}

/// `GET /webhooks`
pub async fn list<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Query(q): Query<NoticeQuery>,
) -> PageResult {
    let endpoints = s.warehouse.webhooks(&user.tenant).await?;
    Ok(list_page(&user, &endpoints, None, q.notice.as_deref()))
}

/// `POST /webhooks`: makes an endpoint and shows its secret, once (not redirected).
pub async fn create<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    body: axum::body::Bytes,
) -> PageResult {
    let pairs = form_pairs(&body);
    let events = pairs
        .iter()
        .filter(|(k, _)| k == "event")
        .map(|(_, v)| {
            EventType::parse(v)
                .ok_or_else(|| PageError(ApiError::bad_request(format!("unknown event {v:?}"))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let threshold = form_value(&pairs, "quarantine_threshold")
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u64>().map_err(|_| {
                PageError(ApiError::bad_request(
                    "the quarantine threshold is a whole number of rows",
                ))
            })
        })
        .transpose()?;
    let made = make_webhook(
        &s,
        &user.caller,
        NewWebhookBody {
            url: form_value(&pairs, "url").unwrap_or_default(),
            events: Some(events),
            quarantine_threshold: threshold,
            description: form_value(&pairs, "description"),
        },
    )
    .await?;
    let endpoints = s.warehouse.webhooks(&user.tenant).await?;
    Ok(list_page(&user, &endpoints, Some(&made.secret), None))
}

fn status_badge(status: DeliveryStatus) -> Markup {
    let class = match status {
        DeliveryStatus::Delivered => "ok",
        DeliveryStatus::Pending => "running",
        DeliveryStatus::Failed => "failed",
    };
    html! { span class={ "badge " (class) } { (status.as_str()) } }
}

async fn endpoint_page<W: Store>(
    s: &AppState<W>,
    user: &SignedIn,
    id: &str,
    secret: Option<&str>,
    notice: Option<&str>,
) -> PageResult {
    let e = endpoint(s, &user.tenant, id).await?;
    let deliveries = s
        .warehouse
        .webhook_deliveries(&user.tenant, id, None, 100)
        .await?;
    let mut last_answers = Vec::with_capacity(deliveries.len());
    for d in &deliveries {
        let attempts = s.warehouse.delivery_attempts(&user.tenant, &d.id).await?;
        last_answers.push(attempts.last().map(|a| {
            a.status_code
                .map_or_else(|| a.response.clone(), |c| c.to_string())
        }));
    }
    let action = |what: &str| format!("/webhooks/{}/{what}", url_encode(&e.id));
    let body = html! {
        h1 { "Webhook endpoint" }
        @if let Some(secret) = secret { (secret_notice(secret)) }
        dl class="facts" {
            dt { "URL" } dd class="mono" { (e.url) }
            dt { "Events" } dd { @for (i, t) in e.events.iter().enumerate() { @if i > 0 { ", " } (t.as_str()) } }
            dt { "run.quarantined over" } dd { (e.quarantine_threshold) " rows" }
            dt { "Secret made" } dd { (when(&e.secret_rotated_at)) }
        }
        @if may(user, "post", "/webhooks/{id}/test") {
            div class="actions" {
                form method="post" action=(action("test")) { (csrf_field(user)) button type="submit" { "Send a test event" } }
                form method="post" action=(action("rotate")) { (csrf_field(user)) button type="submit" { "Rotate the secret" } }
                form method="post" action=(action("delete")) { (csrf_field(user)) button type="submit" class="danger" { "Delete endpoint" } }
            }
        }
        h2 { "Deliveries" }
        @if deliveries.is_empty() { p class="empty" { "Nothing sent yet." } }
        @else {
            div class="table-wrap" {
            table class="data" {
                thead { tr { th scope="col" { "Event" } th scope="col" { "Id" } th scope="col" { "Status" } th scope="col" class="num" { "Attempts" } th scope="col" { "Last answer" } th scope="col" { "Recorded" } th scope="col" { span class="sr-only" { "Actions" } } } }
                tbody {
                    @for (d, answer) in deliveries.iter().zip(&last_answers) {
                        tr {
                            td { span class="rule" { (d.event_type.as_str()) } }
                            td class="mono small" { (d.id) }
                            td { (status_badge(d.status)) }
                            td class="num" { (d.attempts) }
                            td class="small" { (answer.clone().unwrap_or_else(|| "—".into())) }
                            td class="small" { (when(&d.created_at)) }
                            td {
                                @if d.status != DeliveryStatus::Pending && may(user, "post", "/webhook-deliveries/{id}/replay") {
                                    form method="post" action={ "/webhook-deliveries/" (url_encode(&d.id)) "/replay" } {
                                        (csrf_field(user))
                                        button type="submit" aria-label={ "Send " (d.id) " again" } { "Send again" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            }
        }
    };
    Ok(layout(user, "Webhook endpoint", "/webhooks", notice, body))
}

/// `GET /webhooks/{id}`
pub async fn show<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(q): Query<NoticeQuery>,
) -> PageResult {
    endpoint_page(&s, &user, &id, None, q.notice.as_deref()).await
}

/// `POST /webhooks/{id}/test`
pub async fn test<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Path(id): Path<String>,
) -> PageResult {
    send_test(&s, &user.caller, &id, request_id).await?;
    Ok(Redirect::to(&format!("/webhooks/{}?notice=test_sent", url_encode(&id))).into_response())
}

/// `POST /webhooks/{id}/rotate`: the new secret, shown once (not redirected).
pub async fn rotate<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
) -> PageResult {
    let secret = rotate_secret(&s, &user.caller, &id).await?;
    endpoint_page(&s, &user, &id, Some(&secret), None).await
}

/// `POST /webhooks/{id}/delete`
pub async fn delete<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Path(id): Path<String>,
) -> PageResult {
    remove_webhook(&s, &user.caller, &id).await?;
    Ok(Redirect::to("/webhooks?notice=webhook_deleted").into_response())
}

/// `POST /webhook-deliveries/{id}/replay`: back to its endpoint's page.
pub async fn replay<W: Store>(
    State(s): State<Arc<AppState<W>>>,
    Extension(user): Extension<SignedIn>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Path(id): Path<String>,
) -> PageResult {
    let delivery = s
        .warehouse
        .webhook_delivery(&user.tenant, &id)
        .await?
        .ok_or_else(|| PageError(ApiError::not_found(format!("webhook delivery {id}"))))?;
    resend(&s, &user.caller, &id, request_id).await?;
    Ok(Redirect::to(&format!(
        "/webhooks/{}?notice=delivery_queued",
        url_encode(&delivery.endpoint_id)
    ))
    .into_response())
}
