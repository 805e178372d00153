//! Odoo (`kind = "odoo"`): `search_read` over JSON-RPC (`/jsonrpc`, `common.authenticate`
//! then `object.execute_kw`) or over Odoo 19's JSON-2 API (`POST /json/2/<model>/<method>`
//! with the API key as bearer token), read incrementally by `(write_date, id)` with keyset
//! pages: each page asks for what comes after the last record read, so records changed
//! while the read pages are never skipped.
//!
//! Odoo writes `false` for an empty field and datetimes in UTC without an offset; both are
//! read as such. Draft journal entries are filtered out at the source; cancelled ones load
//! as void; a cancelled payment is a deletion.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::{
    RequestRetry, TextBatch, canonical_columns, network, send_with_retries, spawn_reader,
    text_schema, unexpected, unrecognised,
};
use crate::egress::EgressPolicy;
use crate::error::{SourceError, SourceErrorKind};
use crate::source::{
    BatchStream, Deletion, HealthReport, ReadRequest, Source, SourceBatch, StreamInfo, SyncMode,
};

/// How requests reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `/jsonrpc` (every Odoo version).
    JsonRpc,
    /// `/json/2/<model>/<method>` (Odoo 19 and later).
    Json2,
}

/// What a pipeline reads, and the canonical entity it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OdooStream {
    /// `account.move` of these move types: out_invoice/out_refund -> invoices,
    /// in_invoice/in_refund -> bills.
    Moves(Vec<&'static str>),
    /// `account.payment`, inbound and outbound.
    Payments,
    /// `res.partner` with a customer rank.
    Customers,
    /// `res.partner` with a supplier rank.
    Vendors,
    /// `account.account`.
    Accounts,
}

const MOVE_TYPES: [&str; 4] = ["out_invoice", "out_refund", "in_invoice", "in_refund"];

impl OdooStream {
    /// `invoices`, `bills`, `payments`, `customers`, `vendors`, `accounts`, or
    /// `account.move:<move_type>`.
    pub fn parse(name: &str) -> Result<Self, SourceError> {
        let bad = || {
            SourceError::new(
                SourceErrorKind::Config,
                format!(
                    "odoo stream {name:?} is not one sluice reads; streams: invoices, bills, payments, customers, vendors, accounts, account.move:<out_invoice|out_refund|in_invoice|in_refund>, account.payment, account.account"
                ),
            )
        };
        Ok(match name {
            "invoices" => OdooStream::Moves(vec!["out_invoice", "out_refund"]),
            "bills" => OdooStream::Moves(vec!["in_invoice", "in_refund"]),
            "payments" | "account.payment" => OdooStream::Payments,
            "customers" => OdooStream::Customers,
            "vendors" => OdooStream::Vendors,
            "accounts" | "account.account" => OdooStream::Accounts,
            other => {
                let t = other.strip_prefix("account.move:").ok_or_else(bad)?;
                let t = MOVE_TYPES.into_iter().find(|m| *m == t).ok_or_else(bad)?;
                OdooStream::Moves(vec![t])
            }
        })
    }

    /// The model read.
    pub fn model(&self) -> &'static str {
        match self {
            OdooStream::Moves(_) => "account.move",
            OdooStream::Payments => "account.payment",
            OdooStream::Customers | OdooStream::Vendors => "res.partner",
            OdooStream::Accounts => "account.account",
        }
    }

    /// The canonical entity its rows are.
    pub fn entity(&self) -> Result<&'static str, SourceError> {
        match self {
            OdooStream::Moves(types) => {
                let sales = types.iter().all(|t| t.starts_with("out_"));
                let purchases = types.iter().all(|t| t.starts_with("in_"));
                match (sales, purchases) {
                    (true, _) => Ok("invoices"),
                    (_, true) => Ok("bills"),
                    _ => Err(SourceError::new(
                        SourceErrorKind::Config,
                        "an odoo stream reads customer or vendor documents, not both",
                    )),
                }
            }
            OdooStream::Payments => Ok("payments"),
            OdooStream::Customers => Ok("customers"),
            OdooStream::Vendors => Ok("vendors"),
            OdooStream::Accounts => Ok("accounts"),
        }
    }

    fn fields(&self) -> &'static [&'static str] {
        match self {
            OdooStream::Moves(_) => &[
                "id",
                "name",
                "move_type",
                "state",
                "partner_id",
                "invoice_date",
                "invoice_date_due",
                "currency_id",
                "amount_total",
                "amount_residual",
                "write_date",
            ],
            OdooStream::Payments => &[
                "id",
                "payment_type",
                "state",
                "partner_id",
                "date",
                "amount",
                "currency_id",
                "reconciled_invoice_ids",
                "reconciled_bill_ids",
                "write_date",
            ],
            OdooStream::Customers | OdooStream::Vendors => {
                &["id", "name", "email", "active", "write_date"]
            }
            OdooStream::Accounts => &["id", "code", "name", "account_type", "write_date"],
        }
    }

    /// Models with an `active` field hide archived records unless asked for them.
    fn has_active(&self) -> bool {
        matches!(self, OdooStream::Customers | OdooStream::Vendors)
    }

    /// The stream's own filter (before the cursor's).
    fn domain(&self) -> Vec<Value> {
        let mut d = match self {
            // Drafts are never read: they are not documents yet.
            OdooStream::Moves(types) => vec![
                json!(["move_type", "in", types]),
                json!(["state", "!=", "draft"]),
            ],
            OdooStream::Payments => vec![json!(["state", "!=", "draft"])],
            OdooStream::Customers => vec![json!(["customer_rank", ">", 0])],
            OdooStream::Vendors => vec![json!(["supplier_rank", ">", 0])],
            OdooStream::Accounts => Vec::new(),
        };
        if self.has_active() {
            d.push(json!(["active", "in", [true, false]]));
        }
        d
    }

    /// For streams that leave drafts out: the records that are drafts now (a posted entry
    /// or payment reset to draft, perhaps to be deleted, is no longer a document).
    fn drafts_domain(&self) -> Option<Vec<Value>> {
        match self {
            OdooStream::Moves(types) => Some(vec![
                json!(["move_type", "in", types]),
                json!(["state", "=", "draft"]),
            ]),
            OdooStream::Payments => Some(vec![json!(["state", "=", "draft"])]),
            _ => None,
        }
    }

    /// The columns of its batches, named as the canonical fields.
    pub fn columns(&self) -> Result<Vec<&'static str>, SourceError> {
        Ok(canonical_columns(self.entity()?))
    }

    /// One record as text cells, each named by its canonical field; `None` for a
    /// record that is a deletion (a cancelled payment).
    fn row(&self, r: &Value) -> Option<Vec<(&'static str, Option<String>)>> {
        // `false` is how Odoo writes an empty field.
        let get = |k: &str| match r.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(v) => Some(v),
        };
        let text = |k: &str| match get(k)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        // Many2one fields are `[id, display_name]`.
        let m2o = |k: &str, i: usize| match get(k)? {
            Value::Array(a) => a.get(i).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
            _ => None,
        };
        let updated = text("write_date").map(|t| utc(&t));
        Some(match self {
            OdooStream::Moves(types) => {
                let move_type = text("move_type").unwrap_or_default();
                let kind = match move_type.as_str() {
                    "out_refund" | "in_refund" => "credit_note",
                    "in_invoice" => "bill",
                    _ => "invoice",
                };
                let status =
                    (text("state").as_deref() == Some("cancel")).then(|| "void".to_string());
                let issued = text("invoice_date");
                let (party_id, party_name) = if types.iter().any(|t| t.starts_with("in_")) {
                    ("vendor_id", "vendor_name")
                } else {
                    ("customer_id", "customer_name")
                };
                vec![
                    ("external_id", text("id")),
                    ("doc_number", text("name").filter(|n| n != "/")),
                    (party_id, m2o("partner_id", 0)),
                    (party_name, m2o("partner_id", 1)),
                    ("issue_date", issued.clone()),
                    ("due_date", text("invoice_date_due").or(issued)),
                    ("currency", m2o("currency_id", 1)),
                    ("total", text("amount_total")),
                    ("balance", text("amount_residual")),
                    ("status", status),
                    ("kind", Some(kind.to_string())),
                    ("updated_at", updated),
                ]
            }
            OdooStream::Payments => {
                if text("state").as_deref() == Some("cancel") {
                    return None;
                }
                let direction = match text("payment_type").as_deref() {
                    Some("outbound") => "out",
                    _ => "in",
                };
                let ids = |k: &str| -> Vec<String> {
                    get(k)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|v| v.to_string())
                        .collect()
                };
                let mut applied = ids("reconciled_invoice_ids");
                applied.extend(ids("reconciled_bill_ids"));
                vec![
                    ("external_id", text("id")),
                    ("direction", Some(direction.to_string())),
                    ("counterparty_id", m2o("partner_id", 0)),
                    ("date", text("date")),
                    ("amount", text("amount")),
                    ("currency", m2o("currency_id", 1)),
                    (
                        "applied_to",
                        (!applied.is_empty()).then(|| json!(applied).to_string()),
                    ),
                    ("updated_at", updated),
                ]
            }
            OdooStream::Customers | OdooStream::Vendors => vec![
                ("external_id", text("id")),
                ("name", text("name")),
                ("email", text("email")),
                ("currency", None),
                (
                    "active",
                    Some(
                        r.get("active")
                            .and_then(Value::as_bool)
                            .unwrap_or(true)
                            .to_string(),
                    ),
                ),
                ("updated_at", updated),
            ],
            OdooStream::Accounts => vec![
                ("external_id", text("id")),
                ("code", text("code")),
                ("name", text("name")),
                (
                    "type",
                    text("account_type").map(|t| account_type(&t).to_string()),
                ),
                ("updated_at", updated),
            ],
        })
    }
}

/// Odoo account types (16 and later) as the canonical account types.
pub fn account_type(t: &str) -> &'static str {
    match t {
        "expense_direct_cost" => "cogs",
        t if t.starts_with("asset") => "asset",
        t if t.starts_with("liability") => "liability",
        t if t.starts_with("equity") => "equity",
        t if t.starts_with("income") => "income",
        t if t.starts_with("expense") => "expense",
        _ => "other",
    }
}

/// `2024-05-01 10:00:00` (UTC, as Odoo writes it) as RFC 3339.
fn utc(odoo: &str) -> String {
    NaiveDateTime::parse_from_str(odoo, "%Y-%m-%d %H:%M:%S%.f")
        .map(|t| t.and_utc().to_rfc3339())
        .unwrap_or_else(|_| odoo.to_string())
}

/// An Odoo source's settings. `Debug` never shows the API key.
#[derive(Clone)]
pub struct OdooConfig {
    /// The server, e.g. `https://acme.odoo.com`.
    pub url: String,
    /// The database.
    pub db: String,
    /// The user's login.
    pub login: String,
    /// The user's API key.
    pub api_key: String,
    /// What to read.
    pub stream: OdooStream,
    /// JSON-RPC or JSON-2.
    pub transport: Transport,
    /// Records per page.
    pub page_size: usize,
    /// Retries of a request that failed transiently.
    pub retry: RequestRetry,
    /// Which hosts the requests may reach.
    pub egress: EgressPolicy,
    /// How long one request may take, answer included; past it the request counts as a
    /// transient failure and is retried as [`Self::retry`] says.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for OdooConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdooConfig")
            .field("url", &self.url)
            .field("db", &self.db)
            .field("login", &self.login)
            .field("api_key", &"<redacted>")
            .field("stream", &self.stream)
            .field("transport", &self.transport)
            .finish()
    }
}

/// An Odoo stream.
#[derive(Clone)]
pub struct OdooSource {
    config: Arc<OdooConfig>,
    http: reqwest::Client,
    uid: Arc<OnceCell<i64>>,
    ids: Arc<AtomicU64>,
}

impl std::fmt::Debug for OdooSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdooSource")
            .field("config", &self.config)
            .finish()
    }
}

/// A batch of a read that has reached `cursor` (the last `(write_date, id)`).
/// One page of `search_read` records: the rows, their positions, and the records that
/// are deletions (an entry reset to draft, a cancelled one).
#[derive(Debug)]
pub struct OdooPage {
    /// The rows, as text columns.
    pub records: arrow_array::RecordBatch,
    /// Each row's position in the read.
    pub positions: Vec<u64>,
    /// Records that mark a loaded row deleted.
    pub deletions: Vec<Deletion>,
}

impl OdooStream {
    /// Maps one page of `search_read` records, advancing `position` and `cursor`.
    fn page(
        &self,
        schema: &arrow_schema::SchemaRef,
        records: &[Value],
        position: &mut u64,
        cursor: &mut Option<(String, i64)>,
    ) -> Result<OdooPage, SourceError> {
        let mut batch = TextBatch::new(schema.clone());
        let mut positions = Vec::new();
        let mut deletions = Vec::new();
        for r in records {
            *position += 1;
            let id = r.get("id").and_then(Value::as_i64);
            let at = r.get("write_date").and_then(Value::as_str);
            match self.row(r) {
                Some(row) => {
                    positions.push(*position);
                    batch.push(row);
                }
                None => deletions.push(Deletion {
                    position: *position,
                    external_id: id.map(|i| i.to_string()).unwrap_or_default(),
                    deleted_at: odoo_micros(at),
                }),
            }
            if let (Some(id), Some(at)) = (id, at) {
                *cursor = Some((at.to_string(), id));
            }
        }
        Ok(OdooPage {
            records: batch.finish()?,
            positions,
            deletions,
        })
    }

    /// Decodes the body of a JSON-RPC `search_read` answer as the reader does: an `error`
    /// envelope becomes a classified failure, the `result` records a page. Public so the
    /// wire parser can be fuzzed and tested on its own.
    pub fn decode_search_read(&self, body: &str) -> Result<OdooPage, SourceError> {
        let v: Value = serde_json::from_str(body)
            .map_err(|_| unexpected("odoo /jsonrpc", unrecognised(body)))?;
        if let Some(err) = v.get("error") {
            return Err(envelope_error(err, "search_read"));
        }
        let records = v
            .get("result")
            .and_then(Value::as_array)
            .ok_or_else(|| unexpected("odoo search_read", "not a list"))?;
        let schema = text_schema(&self.columns()?);
        self.page(&schema, records, &mut 0, &mut None)
    }
}

fn odoo_batch(
    records: arrow_array::RecordBatch,
    positions: Vec<u64>,
    deletions: Vec<Deletion>,
    cursor: &Option<(String, i64)>,
    location: &str,
) -> SourceBatch {
    SourceBatch {
        records,
        positions,
        rejects: Vec::new(),
        deletions,
        cursor: cursor.as_ref().map_or(
            Value::Null,
            |(at, id)| json!({ "write_date": at, "id": id }),
        ),
        location: location.to_string(),
        sheet: None,
    }
}

/// An Odoo datetime (UTC) as microseconds; now when it is absent or unreadable.
fn odoo_micros(t: Option<&str>) -> i64 {
    t.and_then(|t| NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").ok())
        .map_or_else(
            || chrono::Utc::now().timestamp_micros(),
            |t| t.and_utc().timestamp_micros(),
        )
}

/// An Odoo error (`error.data.name` and message) as a classified failure.
/// A JSON-RPC `error` envelope as a classified failure.
fn envelope_error(err: &Value, what: &str) -> SourceError {
    let name = err
        .pointer("/data/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let message = err
        .pointer("/data/message")
        .or_else(|| err.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("");
    odoo_error(name, message, what)
}

fn odoo_error(name: &str, message: &str, what: &str) -> SourceError {
    let kind = match name {
        "odoo.exceptions.AccessDenied" | "odoo.http.SessionExpiredException" => {
            SourceErrorKind::Auth
        }
        "odoo.exceptions.AccessError" => SourceErrorKind::Auth,
        "odoo.exceptions.MissingError" | "werkzeug.exceptions.NotFound" => {
            SourceErrorKind::NotFound
        }
        "odoo.exceptions.ConcurrencyError"
        | "psycopg2.errors.SerializationFailure"
        | "psycopg2.OperationalError"
        | "odoo.addons.base.models.ir_cron.CompletedReport" => SourceErrorKind::Transient,
        _ => SourceErrorKind::Config,
    };
    SourceError::new(kind, format!("odoo {what}: {name}: {message}"))
}

/// A cursor: the last record's `write_date` and id.
fn cursor_of(v: Option<&Value>) -> Option<(String, i64)> {
    let v = v?;
    Some((
        v.get("write_date")?.as_str()?.to_string(),
        v.get("id")?.as_i64()?,
    ))
}

impl OdooSource {
    /// A source for `config`.
    pub fn new(config: OdooConfig) -> Result<Self, SourceError> {
        config.stream.entity()?;
        if config.page_size == 0 {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                "odoo pages hold at least one record",
            ));
        }
        config.egress.check_url(&config.url)?;
        let http = config
            .egress
            .http_client()
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(10).min(config.request_timeout))
            .build()
            .map_err(|e| SourceError::new(SourceErrorKind::Config, format!("http client: {e}")))?;
        Ok(OdooSource {
            config: Arc::new(config),
            http,
            uid: Arc::new(OnceCell::new()),
            ids: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The stream read.
    pub fn stream(&self) -> &OdooStream {
        &self.config.stream
    }

    fn location(&self) -> String {
        format!("odoo:{}/{}", self.config.db, self.config.stream.model())
    }

    /// POSTs `body` to `path`, retrying 429, 5xx and network failures; returns the status
    /// and the parsed body.
    async fn post(
        &self,
        path: &str,
        body: &Value,
        bearer: bool,
    ) -> Result<(u16, Value), SourceError> {
        let url = format!("{}{path}", self.config.url.trim_end_matches('/'));
        let what = format!("odoo {path}");
        // A JSON-RPC error is answered with 200; a 429 or 5xx is the server or a proxy.
        let (this, url_ref, what_ref) = (self, &url, &what);
        let answer = send_with_retries(&self.config.retry, &what, || async move {
            let mut request = this.http.post(url_ref).json(body);
            if bearer {
                // As Odoo documents it: `bearer <key>`.
                let mut key = reqwest::header::HeaderValue::from_str(&format!(
                    "bearer {}",
                    this.config.api_key
                ))
                .map_err(|_| {
                    SourceError::new(
                        SourceErrorKind::Config,
                        "the odoo api_key has characters an HTTP header cannot carry",
                    )
                })?;
                key.set_sensitive(true);
                request = request
                    .header(reqwest::header::AUTHORIZATION, key)
                    .header("X-Odoo-Database", &this.config.db);
            }
            request.send().await.map_err(|e| network(what_ref, e))
        })
        .await?;
        let (status, text) = (answer.status, answer.body);
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        match (status, parsed) {
            (429, _) => Err(SourceError::new(
                SourceErrorKind::RateLimited,
                format!("{what}: HTTP 429: {}", unrecognised(&text)),
            )),
            (s, None) if s >= 500 => Err(SourceError::new(
                SourceErrorKind::Transient,
                format!("{what}: HTTP {s}: {}", unrecognised(&text)),
            )),
            (_, Some(v)) => Ok((status, v)),
            (s, None) => Err(unexpected(
                &format!("{what} (HTTP {s})"),
                unrecognised(&text),
            )),
        }
    }

    /// One JSON-RPC call; an `error` envelope becomes a classified failure.
    async fn rpc(&self, service: &str, method: &str, args: Value) -> Result<Value, SourceError> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "jsonrpc": "2.0",
            "method": "call",
            "params": { "service": service, "method": method, "args": args },
            "id": id,
        });
        let (status, v) = self.post("/jsonrpc", &body, false).await?;
        if let Some(err) = v.get("error") {
            return Err(envelope_error(err, &format!("{service}.{method}")));
        }
        if status != 200 {
            return Err(unexpected("odoo /jsonrpc", format!("HTTP {status}")));
        }
        v.get("result")
            .cloned()
            .ok_or_else(|| unexpected("odoo /jsonrpc", "no result"))
    }

    /// The user id (JSON-RPC): `false` means the credentials were refused.
    async fn uid(&self) -> Result<i64, SourceError> {
        self.uid
            .get_or_try_init(|| async {
                let c = &self.config;
                let r = self
                    .rpc("common", "authenticate", json!([c.db, c.login, c.api_key, {}]))
                    .await?;
                r.as_i64().ok_or_else(|| {
                    SourceError::new(
                        SourceErrorKind::Auth,
                        format!(
                            "odoo refused the login {:?} with this API key on database {:?}: check the login and the key",
                            c.login, c.db
                        ),
                    )
                })
            })
            .await
            .copied()
    }

    /// `model.method(**kwargs)` over the configured transport.
    async fn call(&self, method: &str, domain: Value, kwargs: Value) -> Result<Value, SourceError> {
        let model = self.config.stream.model();
        match self.config.transport {
            Transport::JsonRpc => {
                let uid = self.uid().await?;
                let c = &self.config;
                self.rpc(
                    "object",
                    "execute_kw",
                    json!([c.db, uid, c.api_key, model, method, [domain], kwargs]),
                )
                .await
            }
            Transport::Json2 => {
                let mut body = kwargs;
                if let Some(o) = body.as_object_mut() {
                    o.insert("domain".into(), domain);
                }
                let (status, v) = self
                    .post(&format!("/json/2/{model}/{method}"), &body, true)
                    .await?;
                if status == 200 {
                    return Ok(v);
                }
                let name = v.get("name").and_then(Value::as_str).unwrap_or("");
                let message = v.get("message").and_then(Value::as_str).unwrap_or("");
                let mut e = odoo_error(name, message, &format!("{model}.{method}"));
                if status == 401 {
                    e = SourceError::new(SourceErrorKind::Auth, e.message().to_string());
                }
                Err(e)
            }
        }
    }

    async fn read_all(
        self,
        from: Option<Value>,
        tx: super::BatchSender,
    ) -> Result<(), SourceError> {
        let stream = &self.config.stream;
        let schema = text_schema(&stream.columns()?);
        let mut cursor = cursor_of(from.as_ref());
        if from.is_some() && cursor.is_none() {
            tracing::warn!(cursor = ?from, "odoo cursor not understood; reading from the start");
        }
        let location = self.location();
        let mut position = 0u64;
        loop {
            let mut domain = stream.domain();
            if let Some((at, id)) = &cursor {
                domain.insert(0, json!("|"));
                domain.insert(1, json!(["write_date", ">", at]));
                domain.insert(2, json!("&"));
                domain.insert(3, json!(["write_date", "=", at]));
                domain.insert(4, json!(["id", ">", id]));
            }
            let records = self
                .call(
                    "search_read",
                    Value::Array(domain),
                    json!({
                        "fields": stream.fields(),
                        "offset": 0,
                        "limit": self.config.page_size,
                        "order": "write_date asc, id asc",
                    }),
                )
                .await?;
            let records = records
                .as_array()
                .ok_or_else(|| unexpected("odoo search_read", "not a list"))?;
            let page = stream.page(&schema, records, &mut position, &mut cursor)?;
            let fetched = records.len();
            if fetched > 0 {
                let out = odoo_batch(
                    page.records,
                    page.positions,
                    page.deletions,
                    &cursor,
                    &location,
                );
                if tx.send(Ok(out)).await.is_err() {
                    return Ok(());
                }
            }
            if fetched < self.config.page_size {
                break;
            }
        }
        // Entries reset to draft since the previous read: their loaded copies are marked
        // deleted (only their ids are read). Whatever changed after the last record that
        // read saw has a later write_date; a minute of margin covers clocks and concurrent
        // commits, and a draft reported twice marks nothing the second time.
        if let (Some(drafts), Some((at, _))) = (stream.drafts_domain(), cursor_of(from.as_ref())) {
            let since = NaiveDateTime::parse_from_str(&at, "%Y-%m-%d %H:%M:%S%.f")
                .map(|t| {
                    (t - chrono::Duration::seconds(60))
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string()
                })
                .unwrap_or(at);
            let mut after_id = 0i64;
            loop {
                let mut domain = drafts.clone();
                domain.push(json!(["write_date", ">=", since]));
                domain.push(json!(["id", ">", after_id]));
                let records = self
                    .call(
                        "search_read",
                        Value::Array(domain),
                        json!({
                            "fields": ["id", "write_date"],
                            "offset": 0,
                            "limit": self.config.page_size,
                            "order": "id asc",
                        }),
                    )
                    .await?;
                let records = records
                    .as_array()
                    .ok_or_else(|| unexpected("odoo search_read", "not a list"))?;
                let mut deletions = Vec::new();
                for r in records {
                    let Some(id) = r.get("id").and_then(Value::as_i64) else {
                        continue;
                    };
                    after_id = after_id.max(id);
                    position += 1;
                    deletions.push(Deletion {
                        position,
                        external_id: id.to_string(),
                        deleted_at: odoo_micros(r.get("write_date").and_then(Value::as_str)),
                    });
                }
                if !deletions.is_empty() {
                    let out = odoo_batch(
                        TextBatch::new(schema.clone()).finish()?,
                        Vec::new(),
                        deletions,
                        &cursor,
                        &location,
                    );
                    if tx.send(Ok(out)).await.is_err() {
                        return Ok(());
                    }
                }
                if records.len() < self.config.page_size {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Source for OdooSource {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        Ok(vec![StreamInfo {
            name: self.config.stream.model().to_string(),
            schema: text_schema(&self.config.stream.columns()?),
            sync_mode: SyncMode::Incremental,
        }])
    }

    async fn check(&self) -> Result<HealthReport, SourceError> {
        let started = Instant::now();
        let n = self
            .call(
                "search_count",
                Value::Array(self.config.stream.domain()),
                json!({}),
            )
            .await?;
        Ok(HealthReport {
            detail: format!(
                "odoo database {}: {} {} records",
                self.config.db,
                n,
                self.config.stream.model()
            ),
            latency: started.elapsed(),
        })
    }

    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        // Refused credentials fail the run before the first batch.
        if self.config.transport == Transport::JsonRpc {
            self.uid().await?;
        }
        let source = self.clone();
        Ok(spawn_reader(self.location(), move |tx| {
            source.read_all(request.from, tx)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_read_answers_decode_to_rows_or_a_classified_error_without_the_body() {
        let stream = OdooStream::parse("invoices").expect("stream");
        let page = r#"{"jsonrpc":"2.0","id":1,"result":[{"id":5,"name":"INV/1","partner_id":[7,"Acme"],"invoice_date":"2024-01-02","invoice_date_due":"2024-02-01","amount_total":10.5,"amount_residual":10.5,"currency_id":[1,"USD"],"state":"posted","move_type":"out_invoice","write_date":"2024-01-02 10:00:00"}]}"#;
        let decoded = stream.decode_search_read(page).expect("page");
        assert_eq!(decoded.records.num_rows() + decoded.deletions.len(), 1);
        let denied = r#"{"jsonrpc":"2.0","id":1,"error":{"code":200,"message":"Odoo Server Error","data":{"name":"odoo.exceptions.AccessDenied","message":"Access Denied"}}}"#;
        assert_eq!(
            stream
                .decode_search_read(denied)
                .expect_err("denied")
                .kind(),
            SourceErrorKind::Auth
        );
        let err = stream
            .decode_search_read("<html>secret internal page</html>")
            .expect_err("junk");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
