//! The console's sessions and guards, in process: sign-in, the cookie, CSRF tokens on forms
//! and on API calls made with the cookie, roles, expiry and revocation. (The pages
//! themselves are driven in a real browser by tests/console/console_test.py.)

mod harness;

use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use chrono::{Duration, Utc};
use harness::Api;
use sluice_engine::control::{
    AccessStore, ConsoleSession, Role, WebhookStore, hash_key, key_prefix,
};
use tower::ServiceExt;

struct Page {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The CSRF token of the page's forms, if it has any.
    fn csrf_or_none(&self) -> Option<String> {
        self.text
            .contains("name=\"csrf\" value=\"")
            .then(|| self.csrf())
    }

    /// The CSRF token of the page's forms.
    fn csrf(&self) -> String {
        let at = self
            .text
            .find("name=\"csrf\" value=\"")
            .expect("a form with a CSRF field");
        let rest = &self.text[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').expect("end")].to_string()
    }
}

async fn send(
    api: &Api,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
    headers: &[(&str, &str)],
) -> Page {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, format!("sluice_session={c}"));
    }
    for (h, v) in headers {
        req = req.header(*h, *v);
    }
    let req = match form {
        Some(f) => req
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(f.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let resp = api.app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = to_bytes(resp.into_body(), 1 << 22).await.expect("body");
    Page {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Signs in with `key`; the session id from the cookie.
async fn sign_in(api: &Api, key: &str) -> String {
    let page = send(
        api,
        Method::POST,
        "/sign-in",
        None,
        Some(&format!("key={key}&next=%2Fruns")),
        &[],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.text);
    assert_eq!(page.location(), "/runs");
    let cookie = page
        .headers
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("a cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    cookie
        .strip_prefix("sluice_session=")
        .and_then(|c| c.split(';').next())
        .expect("the session id")
        .to_string()
}

#[tokio::test]
async fn a_signed_in_browser_reads_pages_and_one_without_a_session_is_sent_to_sign_in() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;

    let anonymous = send(
        &api,
        Method::GET,
        "/quarantine?rule=required",
        None,
        None,
        &[],
    )
    .await;
    assert_eq!(anonymous.status, StatusCode::SEE_OTHER);
    assert_eq!(
        anonymous.location(),
        "/sign-in?next=%2Fquarantine%3Frule%3Drequired"
    );
    let form = send(&api, Method::GET, "/sign-in", None, None, &[]).await;
    assert!(form.text.contains("<label for=\"key\">API key</label>"));
    assert!(form.text.contains(">Sign in</button>"));

    let session = sign_in(&api, &admin).await;
    let overview = send(&api, Method::GET, "/", Some(&session), None, &[]).await;
    assert_eq!(overview.status, StatusCode::OK);
    assert!(overview.text.contains("<h1>Pipelines</h1>"));
    assert!(
        overview.text.contains(">Keys</a>"),
        "an admin's navigation lists Keys"
    );

    // Only the id's hash is stored.
    assert!(
        api.warehouse
            .session(&session)
            .await
            .expect("read")
            .is_none()
    );
    let stored = api
        .warehouse
        .session(&hash_key(&session))
        .await
        .expect("read")
        .expect("the session");
    assert_eq!(Some(stored.key_prefix.as_str()), key_prefix(&admin));
}

#[tokio::test]
async fn invalid_keys_platform_keys_and_sign_ins_from_another_site_are_refused() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let platform = api.key(None, Role::Platform).await;

    let wrong = format!("slk_{}_{}", "0".repeat(12), "0".repeat(64));
    let page = send(
        &api,
        Method::POST,
        "/sign-in",
        None,
        Some(&format!("key={wrong}")),
        &[],
    )
    .await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert!(page.headers.get(header::SET_COOKIE).is_none());
    assert!(page.text.contains("not valid"));

    let page = send(
        &api,
        Method::POST,
        "/sign-in",
        None,
        Some(&format!("key={platform}")),
        &[],
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.headers.get(header::SET_COOKIE).is_none());

    let page = send(
        &api,
        Method::POST,
        "/sign-in",
        None,
        Some(&format!("key={admin}")),
        &[
            ("origin", "https://evil.example"),
            ("host", "sluice.internal"),
        ],
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.headers.get(header::SET_COOKIE).is_none());

    // A path of this site only, after signing in.
    let page = send(
        &api,
        Method::POST,
        "/sign-in",
        None,
        Some(&format!("key={admin}&next=%2F%2Fevil.example%2F")),
        &[
            ("origin", "http://sluice.internal"),
            ("host", "sluice.internal"),
        ],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), "/");
}

#[tokio::test]
async fn the_api_takes_the_session_cookie_but_a_change_needs_the_sessions_csrf_token() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let session = sign_in(&api, &admin).await;
    let token = send(&api, Method::GET, "/", Some(&session), None, &[])
        .await
        .csrf();

    let read = send(
        &api,
        Method::GET,
        "/v1/pipelines",
        Some(&session),
        None,
        &[],
    )
    .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);

    let body = r#"{"role":"viewer"}"#;
    for headers in [vec![], vec![("x-csrf-token", "0".repeat(64))]] {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/v1/keys")
            .header(header::COOKIE, format!("sluice_session={session}"))
            .header(header::CONTENT_TYPE, "application/json");
        for (h, v) in &headers {
            req = req.header(*h, v.as_str());
        }
        let resp = api
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).expect("request"))
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    let resp = api
        .app
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/v1/keys")
                .header(header::COOKIE, format!("sluice_session={session}"))
                .header(header::CONTENT_TYPE, "application/json")
                .header("x-csrf-token", &token)
                .body(Body::from(body))
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::CREATED);
    // A token is its session's: another session's token does not do.
    let other = sign_in(&api, &admin).await;
    let other_token = send(&api, Method::GET, "/", Some(&other), None, &[])
        .await
        .csrf();
    assert_ne!(token, other_token);
}

#[tokio::test]
async fn forms_need_the_sessions_token_and_the_pages_role() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let analyst = api.key(Some("acme"), Role::Analyst).await;

    let session = sign_in(&api, &analyst).await;
    let overview = send(&api, Method::GET, "/", Some(&session), None, &[]).await;
    assert!(
        !overview.text.contains(">Keys</a>"),
        "the navigation hides what the role cannot open"
    );
    let token = overview.csrf();
    let keys = send(&api, Method::GET, "/keys", Some(&session), None, &[]).await;
    assert_eq!(keys.status, StatusCode::FORBIDDEN);
    assert!(keys.text.contains("needs the admin role"), "{}", keys.text);
    let forged = send(
        &api,
        Method::POST,
        "/keys",
        Some(&session),
        Some(&format!("csrf={token}&role=admin")),
        &[],
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(
        api.warehouse
            .keys(Some(
                &sluice_engine::TenantSlug::parse("acme").expect("slug")
            ))
            .await
            .expect("keys")
            .len(),
        2
    );

    let session = sign_in(&api, &admin).await;
    let token = send(&api, Method::GET, "/", Some(&session), None, &[])
        .await
        .csrf();
    let no_token = send(
        &api,
        Method::POST,
        "/keys",
        Some(&session),
        Some("role=viewer"),
        &[],
    )
    .await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    assert!(no_token.text.contains("CSRF"));
    let made = send(
        &api,
        Method::POST,
        "/keys",
        Some(&session),
        Some(&format!("csrf={token}&role=viewer&name=laptop")),
        &[],
    )
    .await;
    assert_eq!(made.status, StatusCode::OK);
    assert!(made.text.contains("shown once"));
    let again = send(&api, Method::GET, "/keys", Some(&session), None, &[]).await;
    assert!(again.text.contains("laptop"));
    assert!(
        !again.text.contains("value=\"slk_"),
        "the key is not shown again"
    );
}

#[tokio::test]
async fn idle_and_old_sessions_revoked_keys_and_sign_out_end_a_session() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let prefix = key_prefix(&admin).expect("prefix").to_string();
    sign_in(&api, &admin).await;
    let now = Utc::now();
    let plant = |id: &str, created: chrono::DateTime<Utc>, seen: chrono::DateTime<Utc>| {
        let s = ConsoleSession {
            id_hash: hash_key(id),
            key_prefix: prefix.clone(),
            created_at: created,
            last_seen_at: seen,
        };
        let w = api.warehouse.clone();
        async move {
            w.start_session(&s, now - Duration::days(7))
                .await
                .expect("store")
        }
    };
    let idle = "a".repeat(64);
    let old = "b".repeat(64);
    let fresh = "c".repeat(64);
    plant(
        &idle,
        now - Duration::minutes(40),
        now - Duration::minutes(31),
    )
    .await;
    plant(&old, now - Duration::hours(13), now - Duration::minutes(1)).await;
    plant(
        &fresh,
        now - Duration::minutes(5),
        now - Duration::minutes(1),
    )
    .await;
    for (id, alive) in [(&idle, false), (&old, false), (&fresh, true)] {
        let page = send(&api, Method::GET, "/runs", Some(id), None, &[]).await;
        assert_eq!(
            page.status == StatusCode::OK,
            alive,
            "{id}: {}",
            page.status
        );
    }
    assert!(
        api.warehouse
            .session(&hash_key(&idle))
            .await
            .expect("read")
            .is_none()
    );

    // Sign out: the session is gone, whatever the browser keeps.
    let session = sign_in(&api, &admin).await;
    let token = send(&api, Method::GET, "/", Some(&session), None, &[])
        .await
        .csrf();
    let refused = send(
        &api,
        Method::POST,
        "/sign-out",
        Some(&session),
        Some("csrf=x"),
        &[],
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let out = send(
        &api,
        Method::POST,
        "/sign-out",
        Some(&session),
        Some(&format!("csrf={token}")),
        &[],
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .expect("cookie")
            .contains("Max-Age=0")
    );
    assert_eq!(
        send(&api, Method::GET, "/", Some(&session), None, &[])
            .await
            .status,
        StatusCode::SEE_OTHER
    );

    // Revoking the key ends its sessions at once.
    let other = api.key(Some("acme"), Role::Admin).await;
    let other_session = sign_in(&api, &other).await;
    let id = api
        .warehouse
        .key_by_prefix(key_prefix(&other).expect("prefix"))
        .await
        .expect("read")
        .expect("key")
        .id;
    api.warehouse
        .revoke_key(
            Some(&sluice_engine::TenantSlug::parse("acme").expect("slug")),
            &id,
        )
        .await
        .expect("revoke");
    assert_eq!(
        send(&api, Method::GET, "/", Some(&other_session), None, &[])
            .await
            .status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        send(
            &api,
            Method::GET,
            "/v1/pipelines",
            Some(&other_session),
            None,
            &[]
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn an_admin_makes_tests_rotates_and_deletes_a_webhook_endpoint_in_the_console() {
    let api = Api::new().await;
    let admin = api.key(Some("acme"), Role::Admin).await;
    let operator = api.key(Some("acme"), Role::Operator).await;
    let session = sign_in(&api, &admin).await;
    let list = send(&api, Method::GET, "/webhooks", Some(&session), None, &[]).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert!(list.text.contains("No endpoints yet."));
    let token = list.csrf();
    let made = send(
        &api,
        Method::POST,
        "/webhooks",
        Some(&session),
        Some(&format!(
            "csrf={token}&url=https%3A%2F%2Fhooks.example.com%2Fops&event=run.failed&event=dead_letter.created&quarantine_threshold=3&description=ops"
        )),
        &[],
    )
    .await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.text);
    assert!(made.text.contains("shown once") && made.text.contains("value=\"whsec_"));
    let tenant = sluice_engine::TenantSlug::parse("acme").expect("slug");
    let endpoints = api.warehouse.webhooks(&tenant).await.expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let e = &endpoints[0];
    assert_eq!(e.url, "https://hooks.example.com/ops");
    assert_eq!(e.quarantine_threshold, 3);
    assert_eq!(
        e.events,
        vec![
            sluice_engine::control::webhooks::EventType::RunFailed,
            sluice_engine::control::webhooks::EventType::DeadLetterCreated
        ]
    );
    let again = send(&api, Method::GET, "/webhooks", Some(&session), None, &[]).await;
    assert!(again.text.contains("hooks.example.com/ops"));
    assert!(
        !again.text.contains("whsec_"),
        "the secret is not shown again"
    );

    // An address of the server's own network is refused.
    let refused = send(
        &api,
        Method::POST,
        "/webhooks",
        Some(&session),
        Some(&format!(
            "csrf={token}&url=http%3A%2F%2F127.0.0.1%3A6379%2F&event=run.failed"
        )),
        &[],
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.text);

    let page = format!("/webhooks/{}", e.id);
    let tested = send(
        &api,
        Method::POST,
        &format!("{page}/test"),
        Some(&session),
        Some(&format!("csrf={token}")),
        &[],
    )
    .await;
    assert_eq!(tested.status, StatusCode::SEE_OTHER, "{}", tested.text);
    let shown = send(
        &api,
        Method::GET,
        tested.location(),
        Some(&session),
        None,
        &[],
    )
    .await;
    assert!(shown.text.contains("webhook.test"), "{}", shown.text);
    assert!(shown.text.contains("is queued for this endpoint"));
    let rotated = send(
        &api,
        Method::POST,
        &format!("{page}/rotate"),
        Some(&session),
        Some(&format!("csrf={token}")),
        &[],
    )
    .await;
    assert_eq!(rotated.status, StatusCode::OK);
    assert!(rotated.text.contains("value=\"whsec_"));

    // An operator reads the pages but may not change anything.
    let op = sign_in(&api, &operator).await;
    let read = send(&api, Method::GET, &page, Some(&op), None, &[]).await;
    assert_eq!(read.status, StatusCode::OK);
    assert!(!read.text.contains("Delete endpoint"));
    let op_token = read.csrf_or_none();
    let forbidden = send(
        &api,
        Method::POST,
        &format!("{page}/delete"),
        Some(&op),
        Some(&format!("csrf={}", op_token.unwrap_or_default())),
        &[],
    )
    .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);

    let deleted = send(
        &api,
        Method::POST,
        &format!("{page}/delete"),
        Some(&session),
        Some(&format!("csrf={token}")),
        &[],
    )
    .await;
    assert_eq!(deleted.status, StatusCode::SEE_OTHER);
    let gone = send(&api, Method::GET, &page, Some(&session), None, &[]).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}
