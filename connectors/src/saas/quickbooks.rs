//! QuickBooks Online (`kind = "quickbooks"`): the Accounting API's query endpoint, read
//! incrementally by `MetaData.LastUpdatedTime`, with deletions from the change data
//! capture endpoint, OAuth 2.0 with rotating refresh tokens, and the per-realm limits
//! (500 requests a minute, 10 at once) kept on the client side.
//!
//! Reading: `SELECT * FROM <Entity> WHERE MetaData.LastUpdatedTime >= '<cursor>'
//! ORDERBY MetaData.LastUpdatedTime STARTPOSITION n MAXRESULTS m`, paged until a short page.
//! Each page starts a few records before where the last one ended and skips the records it
//! already saw, so a record updated while the read pages (which moves it to the end and
//! shifts the rest forward) does not push an unread record out of sight. The cursor keeps
//! the last `LastUpdatedTime` and the ids read at that instant, so records that share it
//! are neither skipped nor read twice. After the pages, `/cdc` lists what was deleted
//! since the previous run started (QuickBooks keeps 30 days of it); those become
//! deletions the warehouse applies.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, Utc};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{
    Gate, Limits, RequestRetry, TextBatch, TokenStore, canonical_columns, gate_for, network,
    send_with_retries, spawn_reader, text_schema, unexpected, unrecognised,
};
use crate::egress::EgressPolicy;
use crate::error::{SourceError, SourceErrorKind};
use crate::source::{
    BatchStream, Deletion, HealthReport, ReadRequest, Source, SourceBatch, StreamInfo, SyncMode,
};

/// The production API.
pub const PRODUCTION_URL: &str = "https://quickbooks.api.intuit.com";
/// The sandbox API.
pub const SANDBOX_URL: &str = "https://sandbox-quickbooks.api.intuit.com";
/// Intuit's OAuth 2.0 token endpoint.
pub const TOKEN_URL: &str = "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer";
/// The API minor version requested.
pub const MINOR_VERSION: u32 = 75;
/// The most records a query page may ask for.
pub const MAX_PAGE: usize = 1000;
/// Records each page re-reads from the end of the previous one.
const OVERLAP: usize = 10;
/// How far back `/cdc` answers.
const CDC_DAYS: i64 = 30;
/// The most objects one `/cdc` answer holds.
const CDC_MAX: usize = 1000;

/// The documented per-realm limits.
pub const LIMITS: Limits = Limits {
    requests: 500,
    window: Duration::from_secs(60),
    concurrent: 10,
};

/// A QuickBooks entity a pipeline reads, and the canonical entity it becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QboStream {
    /// -> invoices.
    Invoice,
    /// -> invoices, `kind = credit_note`.
    CreditMemo,
    /// -> bills.
    Bill,
    /// -> bills, `kind = credit_note`.
    VendorCredit,
    /// -> payments in.
    Payment,
    /// -> payments out.
    BillPayment,
    /// -> customers.
    Customer,
    /// -> vendors.
    Vendor,
    /// -> accounts.
    Account,
}

impl QboStream {
    /// Every stream.
    pub const ALL: [QboStream; 9] = [
        QboStream::Invoice,
        QboStream::CreditMemo,
        QboStream::Bill,
        QboStream::VendorCredit,
        QboStream::Payment,
        QboStream::BillPayment,
        QboStream::Customer,
        QboStream::Vendor,
        QboStream::Account,
    ];

    /// The entity's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            QboStream::Invoice => "Invoice",
            QboStream::CreditMemo => "CreditMemo",
            QboStream::Bill => "Bill",
            QboStream::VendorCredit => "VendorCredit",
            QboStream::Payment => "Payment",
            QboStream::BillPayment => "BillPayment",
            QboStream::Customer => "Customer",
            QboStream::Vendor => "Vendor",
            QboStream::Account => "Account",
        }
    }

    /// The stream named `name` (as the API spells it).
    pub fn parse(name: &str) -> Result<Self, SourceError> {
        QboStream::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = QboStream::ALL.iter().map(|s| s.name()).collect();
                SourceError::new(
                    SourceErrorKind::Config,
                    format!(
                        "quickbooks stream {name:?} is not one sluice reads; streams: {}",
                        known.join(", ")
                    ),
                )
            })
    }

    /// The canonical entity its rows are.
    pub fn entity(self) -> &'static str {
        match self {
            QboStream::Invoice | QboStream::CreditMemo => "invoices",
            QboStream::Bill | QboStream::VendorCredit => "bills",
            QboStream::Payment | QboStream::BillPayment => "payments",
            QboStream::Customer => "customers",
            QboStream::Vendor => "vendors",
            QboStream::Account => "accounts",
        }
    }

    /// List entities hide inactive records unless asked for them.
    fn is_list(self) -> bool {
        matches!(
            self,
            QboStream::Customer | QboStream::Vendor | QboStream::Account
        )
    }

    /// The columns of its batches, named as the canonical fields.
    pub fn columns(self) -> Vec<&'static str> {
        canonical_columns(self.entity())
    }

    /// One record as text cells, each named by its canonical field. Absent fields are
    /// absent in the API's answers; they become nulls, as do canonical fields QuickBooks
    /// has no value for.
    pub fn row(self, r: &Value) -> Vec<(&'static str, Option<String>)> {
        let text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        let at = |path: &[&str]| {
            let mut v = r;
            for p in path {
                v = v.get(p)?;
            }
            text(v)
        };
        let updated = at(&["MetaData", "LastUpdatedTime"]);
        match self {
            QboStream::Invoice
            | QboStream::CreditMemo
            | QboStream::Bill
            | QboStream::VendorCredit => {
                let (party, party_id, party_name) =
                    if matches!(self, QboStream::Invoice | QboStream::CreditMemo) {
                        ("CustomerRef", "customer_id", "customer_name")
                    } else {
                        ("VendorRef", "vendor_id", "vendor_name")
                    };
                let credit = matches!(self, QboStream::CreditMemo | QboStream::VendorCredit);
                let kind = match self {
                    QboStream::Invoice => "invoice",
                    QboStream::Bill => "bill",
                    _ => "credit_note",
                };
                let issued = at(&["TxnDate"]);
                // Credit memos have no due date: their open credit counts from the day
                // they were issued. A missing DueDate elsewhere means due on issue.
                let due = if credit { None } else { at(&["DueDate"]) }.or_else(|| issued.clone());
                // A credit memo's open amount is its remaining credit.
                let balance = at(&["Balance"]).or_else(|| at(&["RemainingCredit"]));
                // QuickBooks voids a transaction by zeroing it and noting "Voided" in its
                // private note; it has no status field.
                let zero = at(&["TotalAmt"]).is_some_and(|t| t.parse::<f64>() == Ok(0.0));
                let voided = zero
                    && at(&["PrivateNote"])
                        .is_some_and(|n| n.to_ascii_lowercase().contains("voided"));
                vec![
                    ("external_id", at(&["Id"])),
                    ("doc_number", at(&["DocNumber"])),
                    (party_id, at(&[party, "value"])),
                    (party_name, at(&[party, "name"])),
                    ("issue_date", issued),
                    ("due_date", due),
                    ("currency", at(&["CurrencyRef", "value"])),
                    ("total", at(&["TotalAmt"])),
                    ("balance", balance),
                    ("status", voided.then(|| "void".to_string())),
                    ("kind", Some(kind.to_string())),
                    ("updated_at", updated),
                ]
            }
            QboStream::Payment | QboStream::BillPayment => {
                let (party, direction, linked) = if self == QboStream::Payment {
                    ("CustomerRef", "in", "Invoice")
                } else {
                    ("VendorRef", "out", "Bill")
                };
                let applied: Vec<String> = r
                    .get("Line")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|line| line.get("LinkedTxn").and_then(Value::as_array))
                    .flatten()
                    .filter(|t| t.get("TxnType").and_then(Value::as_str) == Some(linked))
                    .filter_map(|t| t.get("TxnId").and_then(text))
                    .collect();
                vec![
                    ("external_id", at(&["Id"])),
                    ("direction", Some(direction.to_string())),
                    ("counterparty_id", at(&[party, "value"])),
                    ("date", at(&["TxnDate"])),
                    ("amount", at(&["TotalAmt"])),
                    ("currency", at(&["CurrencyRef", "value"])),
                    (
                        "applied_to",
                        (!applied.is_empty()).then(|| json!(applied).to_string()),
                    ),
                    ("updated_at", updated),
                ]
            }
            QboStream::Customer | QboStream::Vendor => vec![
                ("external_id", at(&["Id"])),
                (
                    "name",
                    at(&["DisplayName"]).or_else(|| at(&["CompanyName"])),
                ),
                ("email", at(&["PrimaryEmailAddr", "Address"])),
                ("currency", at(&["CurrencyRef", "value"])),
                ("active", at(&["Active"])),
                ("updated_at", updated),
            ],
            QboStream::Account => vec![
                ("external_id", at(&["Id"])),
                ("code", at(&["AcctNum"])),
                ("name", at(&["Name"])),
                (
                    "type",
                    at(&["AccountType"]).map(|t| account_type(&t).to_string()),
                ),
                ("updated_at", updated),
            ],
        }
    }
}

/// QuickBooks account types as the canonical account types.
pub fn account_type(t: &str) -> &'static str {
    match t {
        "Bank" | "Accounts Receivable" | "Other Current Asset" | "Fixed Asset" | "Other Asset" => {
            "asset"
        }
        "Accounts Payable" | "Credit Card" | "Long Term Liability" | "Other Current Liability" => {
            "liability"
        }
        "Equity" => "equity",
        "Income" | "Other Income" => "income",
        "Cost of Goods Sold" => "cogs",
        "Expense" | "Other Expense" => "expense",
        _ => "other",
    }
}

/// A QuickBooks source's settings. `Debug` never shows a secret.
#[derive(Clone)]
pub struct QuickBooksConfig {
    /// The company (realm) id.
    pub realm_id: String,
    /// The app's OAuth client id.
    pub client_id: String,
    /// The app's OAuth client secret.
    pub client_secret: String,
    /// The refresh token the company was connected with (a newer one saved in the
    /// [`TokenStore`] takes its place).
    pub refresh_token: String,
    /// What to read.
    pub stream: QboStream,
    /// The API's base URL.
    pub base_url: String,
    /// The token endpoint.
    pub token_url: String,
    /// Records per query page (at most 1000).
    pub page_size: usize,
    /// Client-side limits (the realm's documented ones by default).
    pub limits: Limits,
    /// Retries of a request that failed transiently.
    pub retry: RequestRetry,
    /// Which hosts the requests may reach (unrestricted unless a caller narrows it).
    pub egress: EgressPolicy,
    /// Whether a health check may refresh the access token to try the credentials. A
    /// refresh spends the company's request budget and may rotate its refresh token, so
    /// the API's health reads turn it off: they check that the service answers.
    pub check_credentials: bool,
    /// How long one request may take, answer included (60 s); past it the request counts
    /// as a transient failure and is retried as [`Self::retry`] says.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for QuickBooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuickBooksConfig")
            .field("realm_id", &self.realm_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("stream", &self.stream)
            .field("base_url", &self.base_url)
            .field("token_url", &self.token_url)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl QuickBooksConfig {
    /// Settings with the production endpoints and documented limits.
    pub fn new(
        realm_id: &str,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
        stream: QboStream,
    ) -> Self {
        QuickBooksConfig {
            realm_id: realm_id.to_string(),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            refresh_token: refresh_token.to_string(),
            stream,
            base_url: PRODUCTION_URL.to_string(),
            token_url: TOKEN_URL.to_string(),
            page_size: MAX_PAGE,
            limits: LIMITS,
            retry: RequestRetry::default(),
            egress: EgressPolicy::unrestricted(),
            check_credentials: true,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// What this process knows of a connection (token endpoint, client, realm), shared by
/// every source of it: the access token (an hour's worth, so a run does not rotate the
/// refresh token each time it starts) and a rotated refresh token the store could not
/// take yet.
#[derive(Default)]
struct Connection {
    access: Option<(String, Instant)>,
    unsaved: Option<String>,
}

/// What the token endpoint said.
enum Exchange {
    Granted(Value),
    InvalidGrant(String),
}

/// A QuickBooks Online stream.
#[derive(Clone)]
pub struct QuickBooksSource {
    config: Arc<QuickBooksConfig>,
    http: reqwest::Client,
    store: Arc<dyn TokenStore>,
    tokens: Arc<Mutex<Connection>>,
    gate: Arc<dyn Gate>,
}

impl std::fmt::Debug for QuickBooksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuickBooksSource")
            .field("config", &self.config)
            .finish()
    }
}

/// The process's state of a connection (token endpoint, client, realm); holding its lock,
/// one refresh at a time.
fn connection(config: &QuickBooksConfig) -> Arc<Mutex<Connection>> {
    type Connections = std::collections::HashMap<String, Arc<Mutex<Connection>>>;
    static LOCKS: OnceLock<std::sync::Mutex<Connections>> = OnceLock::new();
    let key = format!(
        "{} {} {}",
        config.token_url, config.client_id, config.realm_id
    );
    let map = LOCKS.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(key).or_default().clone()
}

/// A Fault (or OAuth error) body as one readable line, with the code it carries.
fn fault_text(body: &str) -> (String, Option<String>) {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    if let Some(v) = parsed {
        if let Some(fault) = v.get("Fault").or_else(|| v.get("fault")) {
            return fault_line(fault);
        }
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            let desc = v
                .get("error_description")
                .and_then(Value::as_str)
                .unwrap_or("");
            return (
                format!("{err} {desc}").trim().to_string(),
                Some(err.to_string()),
            );
        }
    }
    // The throttling answer may be XML whatever was asked for.
    let tag = |name: &str| {
        let open = body.find(&format!("<{name}"))?;
        let start = open + body[open..].find('>')? + 1;
        let end = start + body[start..].find(&format!("</{name}>"))?;
        Some(body[start..end].trim().to_string())
    };
    if let Some(message) = tag("Message") {
        let detail = tag("Detail").unwrap_or_default();
        let code = body
            .find("code=\"")
            .map(|i| &body[i + 6..])
            .and_then(|rest| rest.split('"').next())
            .map(str::to_string);
        return (format!("{message}: {detail}"), code);
    }
    (unrecognised(body), None)
}

/// The records of one query answer (`QueryResponse.<entity>`; none when absent).
fn page_items(v: &Value, entity: &str) -> Result<Vec<Value>, SourceError> {
    let page = v
        .get("QueryResponse")
        .ok_or_else(|| unexpected("quickbooks query", "no QueryResponse"))?;
    match page.get(entity) {
        Some(Value::Array(a)) => Ok(a.clone()),
        None => Ok(Vec::new()),
        Some(other) => Err(unexpected(
            "quickbooks query",
            format!("{entity} is {}", json_kind(other)),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl QboStream {
    /// Decodes the body of a query answer as the reader does (a `Fault` in it is an error)
    /// into the stream's rows. Public so the wire parser can be fuzzed on its own.
    pub fn decode_query_answer(self, body: &str) -> Result<arrow_array::RecordBatch, SourceError> {
        let v: Value = serde_json::from_str(body)
            .map_err(|_| unexpected("quickbooks query", unrecognised(body)))?;
        if let Some(e) = fault_in(&v) {
            return Err(e);
        }
        let mut batch = TextBatch::new(text_schema(&self.columns()));
        for item in page_items(&v, self.name())? {
            batch.push(self.row(&item));
        }
        batch.finish()
    }
}

/// An error answer's body as one line (the service's own fields, or its size when it
/// has none). Public so the parser can be fuzzed on its own.
pub fn error_summary(body: &str) -> String {
    fault_text(body).0
}

/// A `Fault` (or lowercase `fault`) object as one line, with its first error's code.
fn fault_line(fault: &Value) -> (String, Option<String>) {
    let errors = fault
        .get("Error")
        .or_else(|| fault.get("error"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let field = |e: &Value, k: &str| {
        e.get(k)
            .or_else(|| e.get(k.to_lowercase()))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let kind = fault.get("type").and_then(Value::as_str).unwrap_or("Fault");
    let parts: Vec<String> = errors
        .iter()
        .map(|e| {
            let msg = field(e, "Message").unwrap_or_default();
            let detail = field(e, "Detail").unwrap_or_default();
            let code = field(e, "code").unwrap_or_default();
            format!("{msg}: {detail} (code {code})")
        })
        .collect();
    let code = errors.first().and_then(|e| field(e, "code"));
    (format!("{kind}: {}", parts.join("; ")), code)
}

fn qbo_error(kind: SourceErrorKind, what: &str, status: u16, body: &str) -> SourceError {
    let (text, _) = fault_text(body);
    SourceError::new(kind, format!("quickbooks {what}: HTTP {status}: {text}"))
}

/// A 200 that carries a Fault is an error all the same.
fn fault_in(v: &Value) -> Option<SourceError> {
    let fault = v
        .get("Fault")
        .or_else(|| v.get("QueryResponse").and_then(|q| q.get("Fault")))?;
    let text = fault_line(fault).0;
    let kind = match fault.get("type").and_then(Value::as_str) {
        Some("AUTHENTICATION" | "AuthenticationFault" | "AuthorizationFault") => {
            SourceErrorKind::Auth
        }
        Some("SystemFault" | "SERVICE") => SourceErrorKind::Transient,
        _ => SourceErrorKind::Config,
    };
    Some(SourceError::new(
        kind,
        format!("quickbooks answered with a fault: {text}"),
    ))
}

fn parse_time(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(s).ok()
}

/// Where an incremental read stands: the last `LastUpdatedTime` read, the ids read at that
/// instant, when the previous complete run started (deletions are asked for from then on),
/// and, while a run is unfinished, when its first attempt started (a resumed attempt keeps
/// it, so deletions made while the first attempt ran are asked for next time).
#[derive(Debug, Clone, Default, PartialEq)]
struct Cursor {
    updated: Option<String>,
    ids: Vec<String>,
    cdc_since: Option<String>,
    started: Option<String>,
}

impl Cursor {
    fn from_json(v: Option<&Value>) -> Self {
        let Some(v) = v else {
            return Cursor::default();
        };
        Cursor {
            updated: v.get("updated").and_then(Value::as_str).map(str::to_string),
            ids: v
                .get("ids")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect(),
            cdc_since: v
                .get("cdc_since")
                .and_then(Value::as_str)
                .map(str::to_string),
            started: v.get("started").and_then(Value::as_str).map(str::to_string),
        }
    }

    fn to_json(&self) -> Value {
        json!({ "updated": self.updated, "ids": self.ids, "cdc_since": self.cdc_since,
                "started": self.started })
    }

    /// Records `id` read at `updated`; the cursor never moves back.
    fn advance(&mut self, id: &str, updated: &str) {
        let order = self
            .updated
            .as_deref()
            .and_then(parse_time)
            .zip(parse_time(updated))
            .map(|(at, new)| new.cmp(&at));
        if order == Some(std::cmp::Ordering::Less) {
            return;
        }
        if order == Some(std::cmp::Ordering::Equal) {
            if !self.ids.iter().any(|i| i == id) {
                self.ids.push(id.to_string());
            }
        } else {
            self.updated = Some(updated.to_string());
            self.ids = vec![id.to_string()];
        }
    }

    /// Whether the record was read by the run that made this cursor.
    fn covers(&self, id: &str, updated: &str) -> bool {
        let Some(at) = self.updated.as_deref().and_then(parse_time) else {
            return false;
        };
        parse_time(updated).is_some_and(|u| u < at || (u == at && self.ids.iter().any(|i| i == id)))
    }
}

impl QuickBooksSource {
    /// A source that keeps rotated refresh tokens in `store`.
    pub fn new(config: QuickBooksConfig, store: Arc<dyn TokenStore>) -> Result<Self, SourceError> {
        if config.realm_id.is_empty() || !config.realm_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                format!(
                    "quickbooks realm_id {:?} must be the company's numeric id",
                    config.realm_id
                ),
            ));
        }
        if !(1..=MAX_PAGE).contains(&config.page_size) {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                format!(
                    "quickbooks pages hold 1 to {MAX_PAGE} records, not {}",
                    config.page_size
                ),
            ));
        }
        config.egress.check_url(&config.base_url)?;
        config.egress.check_url(&config.token_url)?;
        let http = config
            .egress
            .http_client()
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(10).min(config.request_timeout))
            .build()
            .map_err(|e| SourceError::new(SourceErrorKind::Config, format!("http client: {e}")))?;
        Ok(QuickBooksSource {
            gate: gate_for(
                &format!("quickbooks {} {}", config.base_url, config.realm_id),
                config.limits,
            ),
            tokens: connection(&config),
            config: Arc::new(config),
            http,
            store,
        })
    }

    /// The same source, whose health check does not refresh the access token (see
    /// [`QuickBooksConfig::check_credentials`]).
    pub fn without_credential_check(mut self) -> Self {
        let mut config = (*self.config).clone();
        config.check_credentials = false;
        self.config = Arc::new(config);
        self
    }

    /// Takes requests through `gate` instead of the realm's usual one.
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = gate;
        self
    }

    /// The stream read.
    pub fn stream(&self) -> QboStream {
        self.config.stream
    }

    fn location(&self) -> String {
        format!(
            "quickbooks:{}/{}",
            self.config.realm_id,
            self.config.stream.name()
        )
    }

    /// A valid access token: the cached one, or a new one from the connection's latest
    /// refresh token. One refresh at a time per connection in this process; a refresh
    /// token refused as `invalid_grant` is read again from the store once, in case another
    /// process rotated it a moment ago.
    async fn access_token(&self, renew: bool) -> Result<String, SourceError> {
        let mut tokens = self.tokens.lock().await;
        if !renew
            && let Some((token, expires)) = &tokens.access
            && Instant::now() + Duration::from_secs(60) < *expires
        {
            return Ok(token.clone());
        }
        // A rotated token the store could not take last time goes first.
        if let Some(next) = tokens.unsaved.clone() {
            self.save_rotated(&next).await?;
            tokens.unsaved = None;
        }
        let latest = || async {
            Ok::<_, SourceError>(
                self.store
                    .load()
                    .await?
                    .unwrap_or_else(|| self.config.refresh_token.clone()),
            )
        };
        let mut refresh = latest().await?;
        let mut reread = false;
        let answer = loop {
            match self.exchange(&refresh).await? {
                Exchange::Granted(v) => break v,
                Exchange::InvalidGrant(text) => {
                    if !reread {
                        reread = true;
                        let again = latest().await?;
                        if again != refresh {
                            refresh = again;
                            continue;
                        }
                    }
                    return Err(SourceError::new(
                        SourceErrorKind::Auth,
                        format!(
                            "quickbooks refused the refresh token (invalid_grant: {text}); the connection to company {} was revoked or has expired: an admin must reconnect it and store the new refresh_token",
                            self.config.realm_id
                        ),
                    ));
                }
            }
        };
        let access = answer
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| unexpected("quickbooks token refresh", "no access_token"))?
            .to_string();
        let lifetime = answer
            .get("expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(3600);
        tokens.access = Some((
            access.clone(),
            Instant::now() + Duration::from_secs(lifetime),
        ));
        if let Some(next) = answer.get("refresh_token").and_then(Value::as_str)
            && next != refresh
        {
            // The old refresh token stops working once the new one is used: the new one is
            // the connection's only key. Kept here until the store takes it.
            tokens.unsaved = Some(next.to_string());
            match self.save_rotated(next).await {
                Ok(()) => {
                    tokens.unsaved = None;
                    tracing::info!(realm = %self.config.realm_id, "quickbooks refresh token rotated and saved");
                }
                Err(e) => {
                    tracing::error!(realm = %self.config.realm_id, error = %e, "the rotated quickbooks refresh token is kept in this process until the store takes it");
                }
            }
        }
        Ok(access)
    }

    /// Saves a rotated refresh token, waiting out a store that is unavailable (about a
    /// minute: the token cannot be had again).
    async fn save_rotated(&self, token: &str) -> Result<(), SourceError> {
        let mut wait = Duration::from_millis(200);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.store.save(token).await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == SourceErrorKind::Transient && Instant::now() < deadline => {
                    tracing::warn!(error = %e, "saving the rotated quickbooks refresh token; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(SourceError::new(
                        e.kind(),
                        format!("saving the rotated quickbooks refresh token: {e}"),
                    ));
                }
            }
        }
    }

    /// One `grant_type=refresh_token` exchange, retried on network failures, 429 and 5xx.
    async fn exchange(&self, refresh: &str) -> Result<Exchange, SourceError> {
        let what = "quickbooks token refresh";
        let this = self;
        let answer = send_with_retries(&self.config.retry, what, || async move {
            this.http
                .post(&this.config.token_url)
                .basic_auth(&this.config.client_id, Some(&this.config.client_secret))
                .header(reqwest::header::ACCEPT, "application/json")
                .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh)])
                .send()
                .await
                .map_err(|e| network(what, e))
        })
        .await?;
        let (status, body) = (answer.status, answer.body);
        match status {
            200 => serde_json::from_str(&body)
                .map(Exchange::Granted)
                .map_err(|e| unexpected(what, e)),
            400 | 401 => {
                let (text, code) = fault_text(&body);
                if code.as_deref() == Some("invalid_grant") {
                    return Ok(Exchange::InvalidGrant(text));
                }
                Err(SourceError::new(
                    SourceErrorKind::Auth,
                    format!("{what} refused: HTTP {status}: {text}"),
                ))
            }
            429 => Err(qbo_error(
                SourceErrorKind::RateLimited,
                "token refresh",
                status,
                &body,
            )),
            s if s >= 500 => Err(qbo_error(
                SourceErrorKind::Transient,
                "token refresh",
                status,
                &body,
            )),
            _ => Err(qbo_error(
                SourceErrorKind::Auth,
                "token refresh",
                status,
                &body,
            )),
        }
    }

    /// GETs `path` under the company with `params`: limited, authorised (one refresh and
    /// retry on a 401), retried on 429 and 5xx; a Fault in a 200 is an error.
    async fn get(&self, path: &str, params: &[(&str, String)]) -> Result<Value, SourceError> {
        let url = format!(
            "{}/v3/company/{}/{path}",
            self.config.base_url.trim_end_matches('/'),
            self.config.realm_id
        );
        let what = format!("quickbooks {path}");
        let mut renewed = false;
        loop {
            let (this, url, what_ref) = (self, &url, &what);
            let answer = send_with_retries(&self.config.retry, &what, || async move {
                let token = this.access_token(false).await?;
                let _pass = this.gate.enter().await?;
                this.http
                    .get(url)
                    .query(params)
                    .query(&[("minorversion", MINOR_VERSION.to_string())])
                    .bearer_auth(&token)
                    .header(reqwest::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .map_err(|e| network(what_ref, e))
            })
            .await?;
            let (status, body) = (answer.status, answer.body);
            return match status {
                200 => {
                    let v: Value = serde_json::from_str(&body)
                        .map_err(|_| unexpected(&what, unrecognised(&body)))?;
                    match fault_in(&v) {
                        Some(e) => Err(e),
                        None => Ok(v),
                    }
                }
                401 if !renewed => {
                    // The access token expired or was revoked early: one refresh, one retry.
                    renewed = true;
                    self.tokens.lock().await.access = None;
                    self.access_token(true).await?;
                    continue;
                }
                401 | 403 => Err(qbo_error(SourceErrorKind::Auth, path, status, &body)),
                429 => Err(qbo_error(SourceErrorKind::RateLimited, path, status, &body)),
                s if s >= 500 => Err(qbo_error(SourceErrorKind::Transient, path, status, &body)),
                404 => Err(qbo_error(SourceErrorKind::NotFound, path, status, &body)),
                _ => Err(qbo_error(SourceErrorKind::Config, path, status, &body)),
            };
        }
    }

    fn query_text(&self, since: Option<&str>, start: usize) -> String {
        let stream = self.config.stream;
        let mut clauses = Vec::new();
        if let Some(t) = since {
            clauses.push(format!("MetaData.LastUpdatedTime >= '{t}'"));
        }
        if stream.is_list() {
            clauses.push("Active IN (true, false)".to_string());
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        format!(
            "SELECT * FROM {}{filter} ORDERBY MetaData.LastUpdatedTime STARTPOSITION {start} MAXRESULTS {}",
            stream.name(),
            self.config.page_size
        )
    }

    async fn read_all(
        self,
        from: Option<Value>,
        tx: super::BatchSender,
    ) -> Result<(), SourceError> {
        let stream = self.config.stream;
        let entity = stream.name();
        let schema = text_schema(&stream.columns());
        let previous = Cursor::from_json(from.as_ref());
        // Malformed cursor times are not honoured: read from the start.
        let since = previous.updated.clone().filter(|t| parse_time(t).is_some());
        if previous.updated.is_some() && since.is_none() {
            tracing::warn!(cursor = ?from, "quickbooks cursor not understood; reading from the start");
        }
        let mut cursor = Cursor {
            updated: since.clone(),
            ids: if since.is_some() {
                previous.ids.clone()
            } else {
                Vec::new()
            },
            cdc_since: previous.cdc_since.clone(),
            started: previous.started.clone(),
        };
        let mut run_started: Option<String> = previous.started.clone();
        let mut position = 0u64;
        let mut start = 1usize;
        let mut last_page: HashSet<(String, String)> = HashSet::new();
        let location = self.location();
        loop {
            // At most half a page back, so that every page moves the read forward.
            let overlap = OVERLAP.min(self.config.page_size / 2);
            let from_position = if start > 1 {
                start.saturating_sub(overlap).max(1)
            } else {
                1
            };
            let query = self.query_text(since.as_deref(), from_position);
            let v = self.get("query", &[("query", query)]).await?;
            if run_started.is_none() {
                run_started = v.get("time").and_then(Value::as_str).map(str::to_string);
                cursor.started = run_started.clone();
            }
            let items = page_items(&v, entity)?;
            let fetched = items.len();
            let mut batch = TextBatch::new(schema.clone());
            let mut positions = Vec::new();
            let mut this_page = HashSet::new();
            for item in &items {
                let id = item
                    .get("Id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let updated = item
                    .pointer("/MetaData/LastUpdatedTime")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let key = (id.clone(), updated.clone());
                this_page.insert(key.clone());
                if last_page.contains(&key) || previous.covers(&id, &updated) {
                    continue;
                }
                position += 1;
                positions.push(position);
                batch.push(stream.row(item));
                if !updated.is_empty() {
                    cursor.advance(&id, &updated);
                }
            }
            last_page = this_page;
            if batch.len() > 0 {
                let records = batch.finish()?;
                let out = SourceBatch {
                    records,
                    positions,
                    rejects: Vec::new(),
                    deletions: Vec::new(),
                    cursor: cursor.to_json(),
                    location: location.clone(),
                    sheet: None,
                };
                if tx.send(Ok(out)).await.is_err() {
                    return Ok(());
                }
            }
            if fetched < self.config.page_size {
                break;
            }
            start = from_position + fetched;
        }

        // Deletions since the previous run started, then the cursor for the next run.
        let mut deletions = Vec::new();
        if let Some(since) = previous.cdc_since.as_deref().and_then(parse_time) {
            deletions = self.deletions_since(since, &mut position).await?;
        }
        cursor.cdc_since =
            run_started.or_else(|| Some((Utc::now() - chrono::Duration::minutes(5)).to_rfc3339()));
        cursor.started = None;
        let out = SourceBatch {
            records: TextBatch::new(schema).finish()?,
            positions: Vec::new(),
            rejects: Vec::new(),
            deletions,
            cursor: cursor.to_json(),
            location,
            sheet: None,
        };
        let _ = tx.send(Ok(out)).await;
        Ok(())
    }

    async fn deletions_since(
        &self,
        since: DateTime<FixedOffset>,
        position: &mut u64,
    ) -> Result<Vec<Deletion>, SourceError> {
        let entity = self.config.stream.name();
        let oldest = Utc::now() - chrono::Duration::days(CDC_DAYS) + chrono::Duration::minutes(5);
        let mut since = since.with_timezone(&Utc);
        if since < oldest {
            tracing::warn!(
                %since, "the last quickbooks sync is older than the 30 days of changes the service keeps; deletions before {oldest} cannot be seen"
            );
            since = oldest;
        }
        // A deletion in the same second as the previous run's start may or may not count
        // as changed since it: ask from a minute earlier and keep deletions from that
        // second on. A deletion reported twice marks nothing the second time.
        let floor = since;
        let mut since = since - chrono::Duration::seconds(60);
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        loop {
            let v = self
                .get(
                    "cdc",
                    &[
                        ("entities", entity.to_string()),
                        (
                            "changedSince",
                            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
                        ),
                    ],
                )
                .await?;
            let objects: Vec<Value> = v
                .get("CDCResponse")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| r.get("QueryResponse").and_then(Value::as_array))
                .flatten()
                .filter_map(|q| q.get(entity).and_then(Value::as_array))
                .flatten()
                .cloned()
                .collect();
            let mut latest = since;
            for o in &objects {
                let at = o
                    .pointer("/MetaData/LastUpdatedTime")
                    .and_then(Value::as_str)
                    .and_then(parse_time)
                    .map(|t| t.with_timezone(&Utc));
                if let Some(at) = at
                    && at > latest
                {
                    latest = at;
                }
                if o.get("status").and_then(Value::as_str) == Some("Deleted")
                    && at.is_none_or(|at| at >= floor)
                    && let Some(id) = o.get("Id").and_then(Value::as_str)
                    && seen.insert(id.to_string())
                {
                    *position += 1;
                    out.push(Deletion {
                        position: *position,
                        external_id: id.to_string(),
                        deleted_at: at.unwrap_or_else(Utc::now).timestamp_micros(),
                    });
                }
            }
            // A full answer may have left changes out: ask again from the latest one seen.
            if objects.len() < CDC_MAX || latest <= since {
                if objects.len() >= CDC_MAX {
                    tracing::warn!(
                        "quickbooks /cdc answered {CDC_MAX} objects changed at one instant; some deletions may be missed"
                    );
                }
                return Ok(out);
            }
            since = latest;
        }
    }
}

impl Source for QuickBooksSource {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        Ok(vec![StreamInfo {
            name: self.config.stream.name().to_string(),
            schema: text_schema(&self.config.stream.columns()),
            sync_mode: SyncMode::Incremental,
        }])
    }

    async fn check(&self) -> Result<HealthReport, SourceError> {
        let started = Instant::now();
        if !self.config.check_credentials && self.tokens.lock().await.access.is_none() {
            let url = format!(
                "{}/v3/company/{}/companyinfo/{}",
                self.config.base_url.trim_end_matches('/'),
                self.config.realm_id,
                self.config.realm_id
            );
            let answer = self
                .http
                .get(url)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| network("quickbooks health", e))?;
            return Ok(HealthReport {
                detail: format!(
                    "quickbooks answers (HTTP {} without credentials); a health check does not refresh the access token, the next sync tries the credentials",
                    answer.status().as_u16()
                ),
                latency: started.elapsed(),
            });
        }
        let v = self
            .get(
                "query",
                &[(
                    "query",
                    format!(
                        "SELECT COUNT(*) FROM {}{}",
                        self.config.stream.name(),
                        if self.config.stream.is_list() {
                            " WHERE Active IN (true, false)"
                        } else {
                            ""
                        }
                    ),
                )],
            )
            .await?;
        let count = v
            .pointer("/QueryResponse/totalCount")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Ok(HealthReport {
            detail: format!(
                "quickbooks company {}: {count} {} records",
                self.config.realm_id,
                self.config.stream.name()
            ),
            latency: started.elapsed(),
        })
    }

    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        // Fail before the first batch when the credentials are refused.
        self.access_token(false).await?;
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
    fn query_answers_decode_to_rows_and_anything_else_to_an_error_without_its_body() {
        let stream = QboStream::parse("Invoice").expect("stream");
        let page = r#"{"QueryResponse":{"Invoice":[{"Id":"1","DocNumber":"1001","TxnDate":"2024-01-02","TotalAmt":10.5,"Balance":10.5,"CurrencyRef":{"value":"USD"},"CustomerRef":{"value":"7","name":"Acme"}}]},"time":"2024-01-03T00:00:00Z"}"#;
        assert_eq!(
            stream.decode_query_answer(page).expect("page").num_rows(),
            1
        );
        let fault = r#"{"Fault":{"Error":[{"Message":"Invalid query","Detail":"bad","code":"4000"}],"type":"ValidationFault"}}"#;
        assert!(stream.decode_query_answer(fault).is_err());
        for junk in [
            "<html>secret internal page</html>",
            r#"{"QueryResponse":{"Invoice":"secret"}}"#,
        ] {
            let err = stream.decode_query_answer(junk).expect_err("junk");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        assert!(!error_summary("<html>secret</html>").contains("secret"));
    }

    #[test]
    fn fault_bodies_become_one_readable_line() {
        let json = r#"{"Fault":{"Error":[{"Message":"Invalid Reference Id","Detail":"Something you're trying to use has been made inactive.","code":"2500","element":"CustomerRef"}],"type":"ValidationFault"},"time":"2024-06-01T10:00:00.000-07:00"}"#;
        let (text, code) = fault_text(json);
        assert!(
            text.starts_with("ValidationFault: Invalid Reference Id: Something"),
            "{text}"
        );
        assert_eq!(code.as_deref(), Some("2500"));
        let lower = r#"{"fault":{"error":[{"message":"message=AuthenticationFailed; errorCode=003200; statusCode=401","detail":"Token expired","code":"3200"}],"type":"AUTHENTICATION"}}"#;
        let (text, code) = fault_text(lower);
        assert!(
            text.contains("AuthenticationFailed") && text.contains("Token expired"),
            "{text}"
        );
        assert_eq!(code.as_deref(), Some("3200"));
        let xml = r#"<?xml version="1.0"?><IntuitResponse><Fault type="SERVICE"><Error code="003001"><Message>message=ThrottleExceeded; errorCode=003001; statusCode=429</Message><Detail>The request limit was reached.</Detail></Error></Fault></IntuitResponse>"#;
        let (text, code) = fault_text(xml);
        assert!(
            text.contains("ThrottleExceeded") && text.contains("limit was reached"),
            "{text}"
        );
        assert_eq!(code.as_deref(), Some("003001"));
        let (_, code) = fault_text(r#"{"error":"invalid_grant"}"#);
        assert_eq!(code.as_deref(), Some("invalid_grant"));
        let ok_with_fault: Value = serde_json::from_str(json).expect("json");
        assert_eq!(
            fault_in(&ok_with_fault).map(|e| e.kind()),
            Some(SourceErrorKind::Config)
        );
    }

    #[test]
    fn the_cursor_tells_records_read_at_its_instant_from_later_ones() {
        let mut c = Cursor::default();
        c.advance("1", "2026-11-01T10:00:00-08:00");
        c.advance("2", "2026-11-01T18:00:00Z");
        assert_eq!(c.ids, vec!["1", "2"], "the same instant in another zone");
        c.advance("0", "2026-11-01T09:00:00-08:00");
        assert_eq!(c.ids, vec!["1", "2"], "never back");
        assert!(c.covers("2", "2026-11-01T10:00:00-08:00"));
        assert!(!c.covers("3", "2026-11-01T10:00:00-08:00"));
        assert!(!c.covers("1", "2026-11-01T10:00:01-08:00"));
        let back = Cursor::from_json(Some(&c.to_json()));
        assert_eq!(back, c);
    }

    #[test]
    fn account_types_map_to_canonical_ones() {
        assert_eq!(account_type("Accounts Receivable"), "asset");
        assert_eq!(account_type("Cost of Goods Sold"), "cogs");
        assert_eq!(account_type("Credit Card"), "liability");
        assert_eq!(account_type("Non-Posting"), "other");
    }
}
