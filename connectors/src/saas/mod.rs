//! Sources that read a web service's API: QuickBooks Online and Odoo. What they share:
//! records become batches of text columns named as the canonical fields (the map stage
//! parses them like any other text), requests go through a client-side rate limiter, and
//! failures are classified from the HTTP status and the service's error body so that the
//! retry policy knows what to do with them.

pub mod odoo;
pub mod quickbooks;

use sluice_engine::Entity;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::StringBuilder;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use tokio::sync::{Mutex, Semaphore};

use crate::error::{SourceError, SourceErrorKind};
use crate::source::{BatchStream, SourceBatch, channel_stream};

/// Where a source keeps a credential that the service replaces as it is used (an OAuth
/// refresh token that rotates). `save` must have stored the new value durably (and
/// encrypted) when it returns: the source uses a new token only after that. Every source
/// of one connection (one company, many streams) must see the others' saves: a rotated
/// token replaces the old one for all of them.
pub trait TokenStore: Send + Sync {
    /// The latest saved token of the connection, if one was saved since it was configured
    /// with the token the source was given.
    fn load(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Option<String>, SourceError>> + Send + '_>>;
    /// Saves a new token.
    fn save<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send + 'a>>;
}

/// A token store that keeps tokens in memory only (tests, one-off checks).
#[derive(Debug, Default)]
pub struct MemoryTokens(std::sync::Mutex<Option<String>>);

impl TokenStore for MemoryTokens {
    fn load(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Option<String>, SourceError>> + Send + '_>> {
        let value = self.0.lock().map(|t| t.clone()).unwrap_or(None);
        Box::pin(async move { Ok(value) })
    }

    fn save<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send + 'a>> {
        if let Ok(mut t) = self.0.lock() {
            *t = Some(token.to_string());
        }
        Box::pin(async { Ok(()) })
    }
}

/// A service's documented limits: at most `requests` per `window`, at most `concurrent`
/// requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per window.
    pub requests: usize,
    /// The window.
    pub window: Duration,
    /// Requests in flight at once.
    pub concurrent: usize,
}

/// Admission of requests to one service account (a QuickBooks company), shared by every
/// source that calls it: [`Gate::enter`] waits until one more request may start under the
/// account's [`Limits`], and the returned [`Pass`] is held while the request runs.
pub trait Gate: Send + Sync {
    /// Waits for room for one request.
    fn enter(&self) -> Pin<Box<dyn Future<Output = Result<Pass, SourceError>> + Send + '_>>;
}

/// Held while a request runs; dropping it frees its slot.
pub struct Pass(#[allow(dead_code)] Box<dyn Send + Sync>);

impl Pass {
    /// A pass that frees its slot when `slot` is dropped.
    pub fn new(slot: impl Send + Sync + 'static) -> Self {
        Pass(Box::new(slot))
    }
}

/// The window as a client counts it: a little longer than the service's (2%, at least
/// 250 ms), since the service counts a request when it arrives, which may be a moment (a
/// connection, a busy machine) after the client let it go.
pub fn counted_window(limits: &Limits) -> Duration {
    limits.window + (limits.window / 50).max(Duration::from_millis(250))
}

/// Makes the gate of one service account (`key`) with these limits; installed by a
/// program whose processes share their limits (through Redis), see [`share_limits`].
pub type GateMaker = Arc<dyn Fn(&str, Limits) -> Arc<dyn Gate> + Send + Sync>;

static SHARED_GATES: std::sync::OnceLock<GateMaker> = std::sync::OnceLock::new();

/// Makes every API source of this process take its gates from `maker` (e.g. gates kept in
/// Redis, shared by all the workers of a deployment) instead of in-process limiters. Set
/// once, at start-up; later calls are ignored.
pub fn share_limits(maker: GateMaker) {
    let _ = SHARED_GATES.set(maker);
}

/// The gate of the service account `key`: the shared one when [`share_limits`] was
/// called, else one in-process limiter per key.
pub fn gate_for(key: &str, limits: Limits) -> Arc<dyn Gate> {
    if let Some(maker) = SHARED_GATES.get() {
        return maker(key, limits);
    }
    static LOCAL: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<Limiter>>>,
    > = std::sync::OnceLock::new();
    let map = LOCAL.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(key.to_string())
        .or_insert_with(|| Arc::new(Limiter::new(limits)))
        .clone()
}

/// An in-process limiter that keeps under [`Limits`]: a sliding window of request start
/// times and a semaphore.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    started: Mutex<VecDeque<Instant>>,
    in_flight: Arc<Semaphore>,
}

impl Limiter {
    /// A limiter for `limits`.
    pub fn new(limits: Limits) -> Self {
        Limiter {
            limits,
            started: Mutex::new(VecDeque::new()),
            in_flight: Arc::new(Semaphore::new(limits.concurrent.max(1))),
        }
    }
}

impl Gate for Limiter {
    fn enter(&self) -> Pin<Box<dyn Future<Output = Result<Pass, SourceError>> + Send + '_>> {
        Box::pin(async move {
            let permit = self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .unwrap_or_else(|_| unreachable!("the semaphore is never closed"));
            let window = counted_window(&self.limits);
            loop {
                let wait = {
                    let mut started = self.started.lock().await;
                    let now = Instant::now();
                    while started
                        .front()
                        .is_some_and(|t| now.duration_since(*t) >= window)
                    {
                        started.pop_front();
                    }
                    if started.len() < self.limits.requests.max(1) {
                        started.push_back(now);
                        None
                    } else {
                        started
                            .front()
                            .map(|t| window.saturating_sub(now.duration_since(*t)))
                    }
                };
                match wait {
                    None => return Ok(Pass::new(permit)),
                    Some(d) => tokio::time::sleep(d + Duration::from_millis(1)).await,
                }
            }
        })
    }
}

/// How a source retries a request that failed transiently (5xx, 429, network): up to
/// `attempts` tries, waiting `base`, 2x, 4x ... (or what a 429's `Retry-After` asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRetry {
    /// Tries in all.
    pub attempts: u32,
    /// The first wait.
    pub base: Duration,
}

impl Default for RequestRetry {
    fn default() -> Self {
        RequestRetry {
            attempts: 5,
            base: Duration::from_millis(500),
        }
    }
}

/// The longest wait between two tries of a request: past the twelfth doubling of a
/// one-second base the wait grew past an hour.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The longest a service's `Retry-After` is obeyed.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

impl RequestRetry {
    /// The wait before try `attempt + 1` (1-based `attempt`), or what the server asked:
    /// doubling from `base`, at most [`MAX_BACKOFF`]; a `Retry-After` at most
    /// [`MAX_RETRY_AFTER`].
    pub fn wait(&self, attempt: u32, asked: Option<Duration>) -> Duration {
        match asked {
            Some(asked) => asked.min(MAX_RETRY_AFTER),
            None => self
                .base
                .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
                .min(MAX_BACKOFF),
        }
    }
}

/// Runs `read` (which sends the batches of one read) on its own task; its error, prefixed
/// with `location`, ends the stream.
pub(crate) fn spawn_reader<Fut>(
    location: String,
    read: impl FnOnce(BatchSender) -> Fut,
) -> BatchStream
where
    Fut: Future<Output = Result<(), SourceError>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let errors = tx.clone();
    let reading = read(tx);
    tokio::spawn(async move {
        if let Err(e) = reading.await {
            let _ = errors.send(Err(e.with_context(&location))).await;
        }
    });
    channel_stream(rx)
}

/// The sending end of a read's batches.
pub(crate) type BatchSender = tokio::sync::mpsc::Sender<Result<SourceBatch, SourceError>>;

/// A service's answer: its status and body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// Sends what `send` sends until the answer is neither a 429 nor a 5xx (waiting as
/// `retry` says, or as a 429's `Retry-After` asks) and retries transient failures to get
/// one; after the last try the last answer (or failure) is returned for the caller to
/// classify. `send` is called for every try, so it can take a limiter permit and a token.
pub(crate) async fn send_with_retries<F, Fut>(
    retry: &RequestRetry,
    what: &str,
    mut send: F,
) -> Result<Answer, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<reqwest::Response, SourceError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt >= retry.attempts;
        let response = match send().await {
            Ok(r) => r,
            Err(e) if e.kind().is_transient() && !last => {
                tracing::warn!(error = %e, attempt, "{what}: no answer; retrying");
                tokio::time::sleep(retry.wait(attempt, None)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let status = response.status().as_u16();
        let asked = retry_after(response.headers());
        let body = match read_capped(response, MAX_RESPONSE_BYTES).await {
            Ok(body) => body,
            Err(e) if e.kind().is_transient() && !last => {
                tracing::warn!(error = %e, attempt, "{what}: answer cut off; retrying");
                tokio::time::sleep(retry.wait(attempt, None)).await;
                continue;
            }
            Err(e) => return Err(e.with_context(what)),
        };
        if (status == 429 || status >= 500) && !last {
            let wait = retry.wait(attempt, asked);
            tracing::warn!(status, attempt, wait_ms = wait.as_millis() as u64, detail = %excerpt(&body, 200), "{what}: asked to retry");
            tokio::time::sleep(wait).await;
            continue;
        }
        return Ok(Answer { status, body });
    }
}

/// The largest answer a service may send (a QuickBooks page of 1,000 invoices is a few
/// megabytes): past it the request fails instead of filling memory.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The body of `response`, at most `cap` bytes; a longer one is an error, read no further.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<String, SourceError> {
    let too_long = || {
        SourceError::new(
            SourceErrorKind::Format,
            format!("the answer is longer than the limit of {cap} bytes"),
        )
    };
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        SourceError::new(SourceErrorKind::Transient, "reading the answer").with_source(e)
    })? {
        if body.len() + chunk.len() > cap {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// What an error message says of an answer that is not in the service's error format: its
/// size, never its text (a body can be anything a server chose to send, and errors are
/// shown to every viewer of the tenant).
pub(crate) fn unrecognised(body: &str) -> String {
    format!(
        "an answer of {} bytes that is not in the service's error format",
        body.len()
    )
}

/// The seconds of a `Retry-After` header, if it has one in seconds.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The columns of an API source's batches for a canonical entity: its fields, in the
/// engine's order (the one list of them); an unknown entity has none.
pub(crate) fn canonical_columns(entity: &str) -> Vec<&'static str> {
    entity
        .parse::<Entity>()
        .map(|e| e.fields().iter().map(|f| f.name).collect())
        .unwrap_or_default()
}

/// A network failure (no answer): transient.
pub(crate) fn network(what: &str, e: reqwest::Error) -> SourceError {
    let detail = e.without_url().to_string();
    SourceError::new(SourceErrorKind::Transient, format!("{what}: {detail}"))
}

/// An answer that is not what the service documents.
pub(crate) fn unexpected(what: &str, detail: impl std::fmt::Display) -> SourceError {
    SourceError::new(
        SourceErrorKind::Format,
        format!("{what}: unexpected answer: {detail}"),
    )
}

/// The first `max` characters of a body, for error messages.
pub(crate) fn excerpt(body: &str, max: usize) -> String {
    let body = body.trim();
    match body.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &body[..i]),
        None => body.to_string(),
    }
}

/// Builds a batch of nullable text columns, one row at a time.
pub(crate) struct TextBatch {
    schema: SchemaRef,
    columns: Vec<StringBuilder>,
    rows: usize,
}

/// A schema of nullable text columns.
pub(crate) fn text_schema(columns: &[&str]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

impl TextBatch {
    pub(crate) fn new(schema: SchemaRef) -> Self {
        let columns = (0..schema.fields().len())
            .map(|_| StringBuilder::new())
            .collect();
        TextBatch {
            schema,
            columns,
            rows: 0,
        }
    }

    /// Appends a row of cells named by their columns; a column no cell names is null.
    pub(crate) fn push(&mut self, cells: Vec<(&'static str, Option<String>)>) {
        let mut row: Vec<Option<String>> = vec![None; self.columns.len()];
        for (name, value) in cells {
            match self.schema.index_of(name) {
                Ok(i) => row[i] = value,
                Err(_) => debug_assert!(false, "no column {name} in the batch"),
            }
        }
        for (b, v) in self.columns.iter_mut().zip(row) {
            b.append_option(v);
        }
        self.rows += 1;
    }

    pub(crate) fn len(&self) -> usize {
        self.rows
    }

    pub(crate) fn finish(&mut self) -> Result<RecordBatch, SourceError> {
        let columns: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| SourceError::new(SourceErrorKind::Format, e.to_string()))
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn waits_double_up_to_a_minute_and_retry_after_is_obeyed_up_to_five() {
        let r = RequestRetry {
            attempts: 40,
            base: Duration::from_secs(1),
        };
        assert_eq!(r.wait(1, None), Duration::from_secs(1));
        assert_eq!(r.wait(4, None), Duration::from_secs(8));
        assert_eq!(
            r.wait(13, None),
            MAX_BACKOFF,
            "2^12 s would be over an hour"
        );
        assert_eq!(r.wait(40, None), MAX_BACKOFF);
        assert_eq!(
            r.wait(2, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            r.wait(2, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
    }
}
