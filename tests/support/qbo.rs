//! A local QuickBooks Online, faithful to what the source relies on and to the service's
//! documented behaviour: the query language subset (`SELECT * | COUNT(*) FROM <Entity>
//! [WHERE a op v AND ...] [ORDERBY f] [STARTPOSITION n] [MAXRESULTS m]`, at most 1000 per
//! page, the entity key absent on an empty page, inactive list records hidden unless
//! `Active IN (true, false)`), `/cdc` (30 days, at most 1000 objects, deleted objects as
//! `{"status":"Deleted","Id":...}`), the OAuth token endpoint (Basic client auth, rotating
//! refresh tokens: a used one is dead and answers `invalid_grant`), 401 with the lowercase
//! `fault.error` body, 429 with an XML body, Fault bodies, and the per-realm limits. It
//! can be told to fail, throttle and expire tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, FixedOffset};
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "fake-client";
pub const CLIENT_SECRET: &str = "fake-secret";
pub const REALM: &str = "9130350000000001";
/// The refresh token the fake company is connected with.
pub const FIRST_REFRESH: &str = "rt-0";

/// A change made to the books while a request is served.
pub type Hook = Box<dyn FnMut(&mut Books) + Send>;

/// What the fake holds and how it misbehaves.
#[derive(Default)]
pub struct Books {
    /// Entity -> records (as the API answers them).
    pub records: HashMap<String, Vec<Value>>,
    /// Entity -> deleted (Id, LastUpdatedTime).
    pub deleted: HashMap<String, Vec<(String, String)>>,
    /// The one live refresh token.
    pub refresh_token: String,
    pub refresh_serial: usize,
    /// Live access tokens and how many more requests each may make (None: unlimited).
    pub access: HashMap<String, Option<usize>>,
    /// Each new access token is good for this many requests (a short-lived token).
    pub access_requests: Option<usize>,
    /// Answer the next N API requests with a 503 Fault.
    pub fail_next: usize,
    /// Answer every Nth API request with a 429 (XML body).
    pub throttle_every: Option<usize>,
    /// Answer the next N API requests with a 429 (a burst).
    pub throttle_next: usize,
    /// Hold the next N API requests for `stall` before answering (a client with a
    /// shorter timeout has given up by then).
    pub stall_next: usize,
    pub stall: Duration,
    /// Requests held so.
    pub stalled: usize,
    /// Run this after the first query page is served (a change while the read pages).
    pub after_first_page: Option<Hook>,
    /// How long each API answer takes (so that concurrent requests overlap).
    pub latency: Duration,
    /// Counters.
    pub requests: usize,
    pub refreshes: usize,
    pub unauthorized: usize,
    pub throttled: usize,
    pub queries: Vec<String>,
    /// Requests refused for going over the limits (the client should make this 0).
    pub over_limit: usize,
    pub limits: Option<(usize, Duration, usize)>,
    pub window: std::collections::VecDeque<Instant>,
    pub in_flight: usize,
}

/// A running fake.
pub struct FakeQbo {
    pub url: String,
    pub books: Arc<Mutex<Books>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeQbo {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Shared = Arc<Mutex<Books>>;

pub fn time(t: &str) -> DateTime<FixedOffset> {
    DateTime::parse_from_rfc3339(t).expect("rfc3339")
}

fn now_pacific() -> String {
    chrono::Utc::now()
        .with_timezone(&FixedOffset::west_opt(8 * 3600).expect("offset"))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

impl FakeQbo {
    /// Starts the fake on a free local port.
    pub async fn start(books: Books) -> Self {
        let books = Arc::new(Mutex::new(Books {
            refresh_token: FIRST_REFRESH.to_string(),
            ..books
        }));
        let app = Router::new()
            .route("/oauth2/v1/tokens/bearer", post(token))
            .route("/v3/company/{realm}/query", get(query))
            .route("/v3/company/{realm}/cdc", get(cdc))
            .route("/v3/company/{realm}/companyinfo/{id}", get(company_info))
            .with_state(books.clone());
        let (url, server) = super::serve(app).await;
        FakeQbo { url, books, server }
    }

    pub fn token_url(&self) -> String {
        format!("{}/oauth2/v1/tokens/bearer", self.url)
    }

    /// Enforce these limits on the API (requests per window, concurrent): a request over
    /// them gets a 429 and is counted in `over_limit`.
    pub fn enforce(&self, requests: usize, window: Duration, concurrent: usize) {
        self.books.lock().expect("books").limits = Some((requests, window, concurrent));
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Books) -> T) -> T {
        f(&mut self.books.lock().expect("books"))
    }
}

fn fault(status: StatusCode, kind: &str, message: &str, detail: &str, code: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "Fault": { "Error": [{ "Message": message, "Detail": detail, "code": code, "element": "" }], "type": kind },
            "time": now_pacific(),
        })
        .to_string(),
    )
        .into_response()
}

async fn token(State(books): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let form = form_fields(&body);
    use base64_like::decode_basic;
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(decode_basic);
    if auth != Some((CLIENT_ID.to_string(), CLIENT_SECRET.to_string())) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "error": "invalid_client" })),
        )
            .into_response();
    }
    let mut b = books.lock().expect("books");
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": "unsupported_grant_type" })),
        )
            .into_response();
    }
    if form.get("refresh_token") != Some(&b.refresh_token) || b.refresh_token.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": "invalid_grant" })),
        )
            .into_response();
    }
    b.refreshes += 1;
    b.refresh_serial += 1;
    b.refresh_token = format!("rt-{}", b.refresh_serial);
    let access = format!("at-{}-{}", b.refresh_serial, uuid::Uuid::new_v4());
    let budget = b.access_requests;
    b.access.insert(access.clone(), budget);
    axum::Json(json!({
        "token_type": "bearer",
        "access_token": access,
        "expires_in": 3600,
        "refresh_token": b.refresh_token,
        "x_refresh_token_expires_in": 8_726_400,
    }))
    .into_response()
}

/// `application/x-www-form-urlencoded` fields.
fn form_fields(body: &str) -> HashMap<String, String> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(b);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Admission of one API request: auth, injected faults, limits. `Ok` holds the books.
fn admit(books: &Shared, headers: &HeaderMap, realm: &str) -> Result<(), Box<Response>> {
    let mut b = books.lock().expect("books");
    b.requests += 1;
    let now = Instant::now();
    if let Some((n, window, concurrent)) = b.limits {
        while b
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            b.window.pop_front();
        }
        if b.window.len() >= n || b.in_flight >= concurrent {
            b.over_limit += 1;
            b.throttled += 1;
            return Err(Box::new(throttle()));
        }
        b.window.push_back(now);
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let valid = match b.access.get_mut(&token) {
        Some(Some(0)) => false,
        Some(Some(left)) => {
            *left -= 1;
            true
        }
        Some(None) => true,
        None => false,
    };
    if !valid {
        b.unauthorized += 1;
        return Err(Box::new(
            (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"fault": {"error": [{"message": "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                "detail": "Token expired: the access token has expired", "code": "3200"}], "type": "AUTHENTICATION"},
                "time": now_pacific()})
            .to_string(),
        )
            .into_response(),
        ));
    }
    if realm != REALM {
        return Err(Box::new(fault(
            StatusCode::FORBIDDEN,
            "AuthorizationFault",
            "Authorization Failure",
            "The realm is not the one this token was issued for",
            "003100",
        )));
    }
    if b.fail_next > 0 {
        b.fail_next -= 1;
        return Err(Box::new(fault(
            StatusCode::SERVICE_UNAVAILABLE,
            "SystemFault",
            "An application error has occurred while processing your request",
            "System Failure Error: service unavailable",
            "10000",
        )));
    }
    if b.throttle_next > 0 {
        b.throttle_next -= 1;
        b.throttled += 1;
        return Err(Box::new(throttle()));
    }
    if let Some(every) = b.throttle_every
        && b.requests.is_multiple_of(every)
    {
        b.throttled += 1;
        return Err(Box::new(throttle()));
    }
    b.in_flight += 1;
    Ok(())
}

/// [`admit`], then the answer's latency.
async fn admitted(books: &Shared, headers: &HeaderMap, realm: &str) -> Result<(), Box<Response>> {
    admit(books, headers, realm)?;
    let latency = {
        let mut b = books.lock().expect("books");
        if b.stall_next > 0 {
            b.stall_next -= 1;
            b.stalled += 1;
            b.latency + b.stall
        } else {
            b.latency
        }
    };
    tokio::time::sleep(latency).await;
    Ok(())
}

fn throttle() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CONTENT_TYPE, "application/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?><IntuitResponse xmlns=\"http://schema.intuit.com/finance/v3\" time=\"2024-06-01T10:00:00.000-07:00\"><Fault type=\"SERVICE\"><Error code=\"003001\"><Message>message=ThrottleExceeded; errorCode=003001; statusCode=429</Message><Detail>The request limit was reached.</Detail></Error></Fault></IntuitResponse>",
    )
        .into_response()
}

fn done(books: &Shared) {
    books.lock().expect("books").in_flight -= 1;
}

const LISTS: [&str; 3] = ["Customer", "Vendor", "Account"];

/// A parsed query.
struct Select {
    count: bool,
    entity: String,
    conditions: Vec<(String, String, String)>,
    start: usize,
    max: usize,
}

fn parse_query(q: &str) -> Result<Select, String> {
    let tokens: Vec<&str> = q.split_whitespace().collect();
    let upper: Vec<String> = tokens.iter().map(|t| t.to_uppercase()).collect();
    if upper.first().map(String::as_str) != Some("SELECT") {
        return Err("query must start with SELECT".into());
    }
    let count = match upper.get(1).map(String::as_str) {
        Some("*") => false,
        Some("COUNT(*)") => true,
        _ => return Err("only SELECT * and SELECT COUNT(*) are supported".into()),
    };
    if upper.get(2).map(String::as_str) != Some("FROM") {
        return Err("expected FROM".into());
    }
    let entity = tokens.get(3).ok_or("expected an entity")?.to_string();
    let mut i = 4;
    let mut select = Select {
        count,
        entity,
        conditions: Vec::new(),
        start: 1,
        max: 100,
    };
    let mut rest = upper[i..].join(" ");
    if upper.get(i).map(String::as_str) == Some("WHERE") {
        // Conditions until ORDERBY / STARTPOSITION / MAXRESULTS.
        i += 1;
        let mut cond: Vec<&str> = Vec::new();
        while i < tokens.len()
            && !matches!(
                upper[i].as_str(),
                "ORDERBY" | "ORDER" | "STARTPOSITION" | "MAXRESULTS"
            )
        {
            if upper[i] == "AND" {
                select.conditions.push(condition(&cond.join(" "))?);
                cond.clear();
            } else {
                cond.push(tokens[i]);
            }
            i += 1;
        }
        if !cond.is_empty() {
            select.conditions.push(condition(&cond.join(" "))?);
        }
        rest = upper[i..].join(" ");
    }
    let words: Vec<&str> = rest.split_whitespace().collect();
    let mut j = 0;
    while j < words.len() {
        match words[j] {
            "ORDERBY" => j += 2,
            "ORDER" if words.get(j + 1) == Some(&"BY") => j += 3,
            "ASC" | "DESC" => j += 1,
            "STARTPOSITION" => {
                select.start = words
                    .get(j + 1)
                    .and_then(|n| n.parse().ok())
                    .ok_or("bad STARTPOSITION")?;
                j += 2;
            }
            "MAXRESULTS" => {
                select.max = words
                    .get(j + 1)
                    .and_then(|n| n.parse().ok())
                    .ok_or("bad MAXRESULTS")?;
                j += 2;
            }
            other => return Err(format!("unexpected {other}")),
        }
    }
    // The service answers at most 1000 per page.
    select.max = select.max.min(1000);
    Ok(select)
}

fn condition(text: &str) -> Result<(String, String, String), String> {
    for op in [">=", "<=", "=", "<", ">", " IN ", " in "] {
        if let Some(i) = text.find(op) {
            let field = text[..i].trim().to_string();
            let value = text[i + op.len()..].trim().trim_matches('\'').to_string();
            return Ok((field, op.trim().to_uppercase(), value));
        }
    }
    Err(format!("cannot read the condition {text:?}"))
}

fn matches(record: &Value, (field, op, value): &(String, String, String)) -> bool {
    match field.as_str() {
        "MetaData.LastUpdatedTime" => {
            let Some(at) = record
                .pointer("/MetaData/LastUpdatedTime")
                .and_then(Value::as_str)
            else {
                return false;
            };
            let (a, b) = (time(at), time(value));
            match op.as_str() {
                ">=" => a >= b,
                ">" => a > b,
                "<=" => a <= b,
                "<" => a < b,
                _ => a == b,
            }
        }
        "Active" => {
            let active = record
                .get("Active")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            if op == "IN" {
                value.contains(&active.to_string())
            } else {
                value == &active.to_string()
            }
        }
        "Id" => record.get("Id").and_then(Value::as_str) == Some(value.as_str()),
        _ => false,
    }
}

fn sort_key(r: &Value) -> (DateTime<FixedOffset>, u64) {
    (
        time(
            r.pointer("/MetaData/LastUpdatedTime")
                .and_then(Value::as_str)
                .unwrap_or("1970-01-01T00:00:00Z"),
        ),
        r.get("Id")
            .and_then(Value::as_str)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0),
    )
}

/// `GET /v3/company/{realm}/companyinfo/{realm}`: the company's profile; like every API
/// call, a 401 Fault without a valid access token.
async fn company_info(
    State(books): State<Shared>,
    Path((realm, _id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = admitted(&books, &headers, &realm).await {
        return *r;
    }
    done(&books);
    Json(
        json!({ "CompanyInfo": { "Id": "1", "CompanyName": "Sandbox Company", "Country": "US" },
                 "time": now_pacific() }),
    )
    .into_response()
}

async fn query(
    State(books): State<Shared>,
    Path(realm): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = admitted(&books, &headers, &realm).await {
        return *r;
    }
    let answer = {
        let mut b = books.lock().expect("books");
        let text = params.get("query").cloned().unwrap_or_default();
        b.queries.push(text.clone());
        match parse_query(&text) {
            Err(e) => Err(e),
            Ok(select) => {
                let list = LISTS.contains(&select.entity.as_str());
                let mentions_active = select.conditions.iter().any(|c| c.0 == "Active");
                let mut rows: Vec<Value> = b
                    .records
                    .get(&select.entity)
                    .map(|r| r.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .filter(|r| select.conditions.iter().all(|c| matches(r, c)))
                    .filter(|r| {
                        !list
                            || mentions_active
                            || r.get("Active").and_then(Value::as_bool).unwrap_or(true)
                    })
                    .cloned()
                    .collect();
                rows.sort_by_key(sort_key);
                if select.count {
                    Ok(
                        json!({ "QueryResponse": { "totalCount": rows.len() }, "time": now_pacific() }),
                    )
                } else {
                    let page: Vec<Value> = rows
                        .into_iter()
                        .skip(select.start.saturating_sub(1))
                        .take(select.max)
                        .collect();
                    let body = if page.is_empty() {
                        json!({ "QueryResponse": {}, "time": now_pacific() })
                    } else {
                        let mut q = serde_json::Map::new();
                        q.insert("startPosition".into(), json!(select.start));
                        q.insert("maxResults".into(), json!(page.len()));
                        q.insert(select.entity.clone(), Value::Array(page));
                        json!({ "QueryResponse": q, "time": now_pacific() })
                    };
                    if select.start == 1
                        && let Some(mut hook) = b.after_first_page.take()
                    {
                        hook(&mut b);
                    }
                    Ok(body)
                }
            }
        }
    };
    done(&books);
    match answer {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => fault(
            StatusCode::BAD_REQUEST,
            "ValidationFault",
            "Error parsing query",
            &format!("QueryParserError: {e}"),
            "4000",
        ),
    }
}

async fn cdc(
    State(books): State<Shared>,
    Path(realm): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = admitted(&books, &headers, &realm).await {
        return *r;
    }
    let answer = {
        let b = books.lock().expect("books");
        let since = params.get("changedSince").map(|s| time(s));
        match since {
            None => Err("changedSince is required".to_string()),
            Some(s) if s < chrono::Utc::now() - chrono::Duration::days(30) => {
                Err("changedSince must be within the last 30 days".to_string())
            }
            Some(since) => {
                let mut parts = Vec::new();
                for entity in params
                    .get("entities")
                    .map(String::as_str)
                    .unwrap_or("")
                    .split(',')
                {
                    let mut objects: Vec<Value> = b
                        .records
                        .get(entity)
                        .map(|r| r.as_slice())
                        .unwrap_or_default()
                        .iter()
                        .filter(|r| sort_key(r).0 > since)
                        .cloned()
                        .collect();
                    for (id, at) in b
                        .deleted
                        .get(entity)
                        .map(|d| d.as_slice())
                        .unwrap_or_default()
                    {
                        if time(at) > since {
                            objects.push(json!({"domain": "QBO", "status": "Deleted", "Id": id,
                                "MetaData": {"LastUpdatedTime": at}}));
                        }
                    }
                    objects.sort_by_key(sort_key);
                    objects.truncate(1000);
                    let n = objects.len();
                    let mut q = serde_json::Map::new();
                    if n > 0 {
                        q.insert(entity.to_string(), Value::Array(objects));
                    }
                    q.insert("startPosition".into(), json!(1));
                    q.insert("maxResults".into(), json!(n));
                    q.insert("totalCount".into(), json!(n));
                    parts.push(Value::Object(q));
                }
                Ok(json!({ "CDCResponse": [{ "QueryResponse": parts }], "time": now_pacific() }))
            }
        }
    };
    done(&books);
    match answer {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => fault(
            StatusCode::BAD_REQUEST,
            "ValidationFault",
            "Invalid changedSince",
            &e,
            "2020",
        ),
    }
}

/// Decodes `Basic <base64(id:secret)>` without a base64 crate.
mod base64_like {
    pub fn decode_basic(header: &str) -> Option<(String, String)> {
        let b64 = header.strip_prefix("Basic ")?;
        let bytes = decode(b64)?;
        let text = String::from_utf8(bytes).ok()?;
        let (id, secret) = text.split_once(':')?;
        Some((id.to_string(), secret.to_string()))
    }

    fn decode(s: &str) -> Option<Vec<u8>> {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut buf = 0u32;
        let mut bits = 0;
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = A.iter().position(|a| *a == c)? as u32;
            buf = (buf << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((buf >> bits) as u8);
                buf &= (1 << bits) - 1;
            }
        }
        Some(out)
    }
}
