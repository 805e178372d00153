//! QuickBooks Online and Odoo sources against local fakes of the services (see
//! `support/qbo.rs` and `support/odoo.rs`): full and incremental syncs load every document
//! exactly once with the fixtures' figures; tokens expire, rotate and are kept; a revoked
//! connection is dead with a reason; throttling and server errors are retried within the
//! limits; deletions and cancellations are applied.

mod support;

use sluice_engine::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sluice_connectors::saas::quickbooks::{QboStream, QuickBooksConfig, QuickBooksSource};
use sluice_connectors::saas::{Limits, MemoryTokens, RequestRetry, TokenStore};
use sluice_connectors::{ReadRequest, Source};
use sluice_engine::control::PipelineStore;
use sluice_engine::{RunStatus, SqliteWarehouse, TenantSlug};
use sluice_pipelines::{
    PipelineSource, PipelineSpec, Quiet, RunOptions, RunReport, SourceReach, run_pipeline,
};
use support::Rng;
use support::odoo::{self, Database, FakeOdoo};
use support::pg::MASTER_KEY_HEX;
use support::qbo::{self, Books, FakeQbo};

/// The embedded warehouse, with the master key that seals pipeline secrets.
fn embedded(dir: &Path) -> Arc<SqliteWarehouse> {
    let key = sluice_engine::secrets::MasterKey::from_hex(MASTER_KEY_HEX).expect("key");
    Arc::new(SqliteWarehouse::new(dir.join("data")).with_master_key(key))
}

fn acme() -> TenantSlug {
    TenantSlug::parse("acme").expect("slug")
}

fn money(cents: i64) -> Value {
    // What the services send: a JSON number with two decimals.
    serde_json::from_str(&Decimal::new(cents, 2).to_string()).expect("number")
}

fn dec(v: &Value) -> Decimal {
    v.to_string().parse().expect("decimal")
}

const CURRENCIES: [&str; 3] = ["USD", "EUR", "GBP"];

/// `n` QuickBooks invoices: three currencies, partial and full payments, three records per
/// `LastUpdatedTime` (ties across page ends), times in the company's -08:00 zone.
fn qbo_invoices(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = Rng::new(seed);
    let base = chrono::Utc::now() - chrono::Duration::days(3);
    (1..=n)
        .map(|i| {
            let total = 1_000 + rng.below(900_000) as i64;
            let balance = match rng.below(3) {
                0 => total,
                1 => total / 3,
                _ => 0,
            };
            let currency = CURRENCIES[rng.below(3) as usize];
            let updated = (base + chrono::Duration::seconds((i / 3) as i64))
                .with_timezone(&chrono::FixedOffset::west_opt(8 * 3600).expect("tz"))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
            json!({
                "Id": i.to_string(),
                "SyncToken": "0",
                "DocNumber": format!("INV-{i}"),
                "TxnDate": "2026-10-01",
                "DueDate": "2026-10-31",
                "CustomerRef": { "value": (i % 40).to_string(), "name": format!("Customer {}", i % 40) },
                "CurrencyRef": { "value": currency, "name": currency },
                "TotalAmt": money(total),
                "Balance": money(balance),
                "Line": [{ "Amount": money(total), "DetailType": "SalesItemLineDetail" }],
                "MetaData": { "CreateTime": updated, "LastUpdatedTime": updated },
            })
        })
        .collect()
}

/// Count, and per currency the sums of totals and balances, of documents.
fn figures(
    docs: impl Iterator<Item = (String, Decimal, Decimal)>,
) -> (usize, HashMap<String, (Decimal, Decimal)>) {
    let mut n = 0;
    let mut by = HashMap::new();
    for (currency, total, balance) in docs {
        n += 1;
        let e = by.entry(currency).or_insert((Decimal::ZERO, Decimal::ZERO));
        e.0 += total;
        e.1 += balance;
    }
    (n, by)
}

fn qbo_figures(fake: &FakeQbo) -> (usize, HashMap<String, (Decimal, Decimal)>) {
    fake.with(|b| {
        figures(b.records["Invoice"].iter().map(|r| {
            (
                r["CurrencyRef"]["value"].as_str().expect("cur").to_string(),
                dec(&r["TotalAmt"]),
                dec(&r["Balance"]),
            )
        }))
    })
}

async fn warehouse_invoices(w: &SqliteWarehouse) -> (usize, HashMap<String, (Decimal, Decimal)>) {
    let invoices = w.invoices(&acme()).await.expect("invoices");
    figures(
        invoices
            .into_iter()
            .map(|i| (i.currency, i.total, i.balance)),
    )
}

fn qbo_pipeline(
    dir: &Path,
    name: &str,
    fake: &FakeQbo,
    stream: &str,
    entity: &str,
    page: usize,
) -> PipelineSpec {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ntenant = \"acme\"\nentity = \"{entity}\"\n[source]\nkind = \"quickbooks\"\nrealm_id = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"\nstream = \"{stream}\"\nbase_url = \"{}\"\ntoken_url = \"{}\"\npage_size = {page}\n",
            qbo::REALM,
            qbo::CLIENT_ID,
            qbo::CLIENT_SECRET,
            qbo::FIRST_REFRESH,
            fake.url,
            fake.token_url()
        ),
    )
    .expect("write");
    PipelineSpec::from_file(&path).expect("pipeline")
}

async fn sync(
    spec: &PipelineSpec,
    w: &Arc<SqliteWarehouse>,
) -> Result<RunReport, sluice_pipelines::PipelineError> {
    let source = PipelineSource::for_pipeline(spec, w.clone(), &SourceReach::unrestricted())?;
    run_pipeline(spec, &source, &**w, &RunOptions::default(), &Quiet).await
}

fn succeeded(report: &RunReport) {
    assert_eq!(
        report.ledger.status,
        RunStatus::Succeeded,
        "{:?}",
        report.ledger
    );
    let c = &report.ledger.counts;
    assert_eq!(
        c.rows_read,
        c.loaded() + c.quarantined + c.deduplicated,
        "{c:?}"
    );
    assert_eq!(c.quarantined, 0, "{c:?}");
}

/// Reads a QuickBooks Invoice stream from the start; the records read.
async fn read_invoices(s: &QuickBooksSource) -> usize {
    let mut stream = s
        .read(ReadRequest {
            stream: "Invoice".into(),
            from: None,
            batch_rows: 20,
        })
        .await
        .expect("read");
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        rows += batch.expect("batch").records.num_rows();
    }
    rows
}

/// A token store that refuses its first saves as unavailable (the warehouse restarting).
#[derive(Default)]
struct FlakyTokens {
    inner: MemoryTokens,
    refuse: std::sync::atomic::AtomicUsize,
}

impl TokenStore for FlakyTokens {
    fn load(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<String>, sluice_connectors::SourceError>>
                + Send
                + '_,
        >,
    > {
        self.inner.load()
    }

    fn save<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), sluice_connectors::SourceError>>
                + Send
                + 'a,
        >,
    > {
        use std::sync::atomic::Ordering;
        if self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Box::pin(async {
                Err(sluice_connectors::SourceError::new(
                    sluice_connectors::SourceErrorKind::Transient,
                    "warehouse unavailable: pool timed out",
                ))
            });
        }
        self.inner.save(token)
    }
}

/// QuickBooks rotates the refresh token at every refresh and the old one stops working: a
/// store that is briefly unavailable must not lose the new one (it was lost, and the
/// connection was dead for good), and a second run in the process uses the access token
/// it already has instead of rotating again.
#[tokio::test]
async fn quickbooks_keeps_a_rotated_token_through_an_unavailable_store_and_reuses_the_access_token()
{
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(60, 8))]),
        ..Books::default()
    })
    .await;
    let mut config = QuickBooksConfig::new(
        qbo::REALM,
        qbo::CLIENT_ID,
        qbo::CLIENT_SECRET,
        qbo::FIRST_REFRESH,
        QboStream::Invoice,
    );
    config.base_url = fake.url.clone();
    config.token_url = fake.token_url();
    let store = Arc::new(FlakyTokens {
        refuse: 3.into(),
        ..FlakyTokens::default()
    });
    let first = QuickBooksSource::new(config.clone(), store.clone()).expect("source");
    assert_eq!(read_invoices(&first).await, 60);
    let live = fake.with(|b| b.refresh_token.clone());
    assert_eq!(
        store.inner.load().await.expect("load"),
        Some(live),
        "the rotated token is saved once the store is back"
    );
    let second = QuickBooksSource::new(config, store.clone()).expect("source");
    assert_eq!(read_invoices(&second).await, 60);
    assert_eq!(fake.with(|b| b.refreshes), 1, "one rotation for both runs");
}

fn pacific_now() -> String {
    chrono::Utc::now()
        .with_timezone(&chrono::FixedOffset::west_opt(8 * 3600).expect("tz"))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

#[tokio::test]
async fn quickbooks_full_then_incremental_sync_loads_every_document_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(2_600, 1))]),
        // A record changes while the first read pages: it moves to the end of the order
        // and the records behind it shift forward by one.
        after_first_page: Some(Box::new(|b: &mut Books| {
            let r = &mut b.records.get_mut("Invoice").expect("invoices")[4];
            r["Balance"] = money(0);
            r["MetaData"]["LastUpdatedTime"] = json!(pacific_now());
        })),
        ..Books::default()
    })
    .await;
    let w = embedded(dir.path());
    let spec = qbo_pipeline(
        dir.path(),
        "qbo-invoices",
        &fake,
        "Invoice",
        "invoices",
        1000,
    );

    let first = sync(&spec, &w).await.expect("first sync");
    succeeded(&first);
    assert_eq!(warehouse_invoices(&w).await, qbo_figures(&fake));
    let queries = fake.with(|b| b.queries.clone());
    assert!(
        queries[0].contains("ORDERBY MetaData.LastUpdatedTime STARTPOSITION 1 MAXRESULTS 1000"),
        "{queries:?}"
    );
    assert!(
        queries.iter().any(|q| q.contains("STARTPOSITION 991")),
        "pages overlap: {queries:?}"
    );

    // Between runs (a second later: QuickBooks times have seconds): 30 changed, 20 new,
    // 10 deleted.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.with(|b| {
        let now = pacific_now();
        let invoices = b.records.get_mut("Invoice").expect("invoices");
        for r in invoices.iter_mut().skip(100).step_by(50).take(30) {
            r["Balance"] = money(1);
            r["MetaData"]["LastUpdatedTime"] = json!(now);
        }
        let mut fresh = qbo_invoices(20, 2);
        for (k, r) in fresh.iter_mut().enumerate() {
            r["Id"] = json!((10_000 + k).to_string());
            r["MetaData"]["LastUpdatedTime"] = json!(now);
        }
        invoices.extend(fresh);
        let gone: Vec<Value> = invoices.drain(2_000..2_010).collect();
        let deleted = b.deleted.entry("Invoice".into()).or_default();
        for r in gone {
            deleted.push((r["Id"].as_str().expect("id").to_string(), now.clone()));
        }
    });
    // Deletions in the second a run starts are reported again by the next run (the
    // service's times have seconds), harmlessly; here the next run starts a second later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = sync(&spec, &w).await.expect("second sync");
    succeeded(&second);
    let c = second.ledger.counts;
    assert_eq!(
        c.rows_read, 60,
        "30 changed + 20 new + 10 deleted, nothing else: {c:?}"
    );
    assert_eq!((c.inserted, c.updated), (20, 40), "{c:?}");
    let (n, sums) = warehouse_invoices(&w).await;
    assert_eq!(n, 2_610);
    assert_eq!((n, sums), qbo_figures(&fake));

    // Nothing changed: a third run a second later reads nothing.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = sync(&spec, &w).await.expect("third sync");
    succeeded(&third);
    assert_eq!(
        third.ledger.counts.rows_read, 0,
        "{:?}",
        third.ledger.counts
    );
}

#[tokio::test]
async fn quickbooks_tokens_expire_rotate_are_kept_and_a_revoked_connection_is_dead() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(500, 3))]),
        // Every access token expires after two requests: the sync sees 401s mid-read.
        access_requests: Some(2),
        ..Books::default()
    })
    .await;
    let w = embedded(dir.path());
    let spec = qbo_pipeline(
        dir.path(),
        "qbo-rotating",
        &fake,
        "Invoice",
        "invoices",
        100,
    );

    let first = sync(&spec, &w).await.expect("sync through expiring tokens");
    succeeded(&first);
    assert_eq!(warehouse_invoices(&w).await, qbo_figures(&fake));
    let (refreshes, unauthorized, live) =
        fake.with(|b| (b.refreshes, b.unauthorized, b.refresh_token.clone()));
    assert!(
        refreshes >= 3 && unauthorized >= 2,
        "refreshes {refreshes}, 401s {unauthorized}"
    );
    // The rotated token was saved, sealed, with the pipeline.
    let stored = w
        .pipeline(&acme(), "qbo-rotating")
        .await
        .expect("read")
        .expect("registered");
    assert_eq!(stored.secrets["oauth.refresh_token"], json!(live));

    // The pipeline file still says rt-0, which the service now refuses: the saved token is used.
    fake.with(|b| {
        b.records.get_mut("Invoice").expect("inv")[0]["MetaData"]["LastUpdatedTime"] =
            json!(pacific_now())
    });
    let second = sync(&spec, &w)
        .await
        .expect("second sync with the saved token");
    succeeded(&second);
    assert_eq!(second.ledger.counts.rows_read, 1);

    // The company disconnects the app: the refresh token is refused for good.
    fake.with(|b| b.refresh_token = String::new());
    let spec_file = dir.path().join("qbo-rotating.toml");
    let data = dir.path().join("data");
    let mut trigger = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    trigger
        .arg("--data-dir")
        .arg(&data)
        .args([
            "trigger",
            spec_file.to_str().expect("path"),
            "--wait",
            "--json",
        ])
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_REDIS_URL")
        .env("SLUICE_MASTER_KEY", MASTER_KEY_HEX);
    // Off the test's thread: the fake answering the CLI runs on it.
    let out = tokio::task::spawn_blocking(move || trigger.output())
        .await
        .expect("join")
        .expect("sluice trigger");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let result: Value =
        serde_json::from_str(stdout.trim().lines().last().expect("json")).expect("json");
    let error = result["error"].as_str().expect("error");
    assert!(
        error.contains("invalid_grant") && error.contains("reconnect"),
        "{error}"
    );
    assert!(
        result["dead_letter"].is_string(),
        "dead at once, not retried: {result}"
    );
    assert_eq!(
        fake.with(|b| b.refreshes),
        refreshes + 1,
        "one refused refresh, no retries"
    );
}

#[tokio::test]
async fn quickbooks_throttling_and_server_errors_are_retried_within_the_limits() {
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(300, 4))]),
        throttle_every: Some(7),
        fail_next: 3,
        latency: Duration::from_millis(20),
        ..Books::default()
    })
    .await;
    // The fake refuses anything over 20 requests a second or 2 at once; the client is told
    // the same limits and must never be refused for them.
    fake.enforce(20, Duration::from_secs(1), 2);
    let config = |stream| {
        let mut c = QuickBooksConfig::new(
            qbo::REALM,
            qbo::CLIENT_ID,
            qbo::CLIENT_SECRET,
            qbo::FIRST_REFRESH,
            stream,
        );
        c.base_url = fake.url.clone();
        c.token_url = fake.token_url();
        c.page_size = 25;
        c.limits = Limits {
            requests: 20,
            window: Duration::from_secs(1),
            concurrent: 2,
        };
        c.retry = RequestRetry {
            attempts: 5,
            base: Duration::from_millis(20),
        };
        c
    };
    // One refresh token serves both readers of the realm.
    let tokens = Arc::new(MemoryTokens::default());
    let a = QuickBooksSource::new(config(QboStream::Invoice), tokens.clone()).expect("source");
    let b = a.clone();
    let read = |s: QuickBooksSource| async move { read_invoices(&s).await };
    let (ra, rb) = tokio::join!(read(a), read(b));
    assert_eq!((ra, rb), (300, 300));
    // Pages smaller than the overlap still move forward: every record once.
    let mut tiny = config(QboStream::Invoice);
    tiny.page_size = 3;
    let tiny = QuickBooksSource::new(tiny, tokens.clone()).expect("source");
    fake.with(|b| b.throttle_every = None);
    assert_eq!(read(tiny).await, 300);
    assert_eq!(fake.with(|b| b.over_limit), 0);
    let (over, throttled, requests) = fake.with(|b| (b.over_limit, b.throttled, b.requests));
    assert_eq!(over, 0, "the client went over the limits {over} times");
    assert!(
        throttled >= 3,
        "the injected 429s were met and retried: {throttled} of {requests}"
    );
}

/// Bursts of every failure QuickBooks answers with (a run of 503 Faults, a run of 429s,
/// requests that hang past the client's timeout), while a source reads: every record once.
#[tokio::test]
async fn quickbooks_bursts_of_5xx_429_and_timeouts_lose_no_record() {
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(300, 5))]),
        latency: Duration::from_millis(5),
        ..Books::default()
    })
    .await;
    let mut c = QuickBooksConfig::new(
        qbo::REALM,
        qbo::CLIENT_ID,
        qbo::CLIENT_SECRET,
        qbo::FIRST_REFRESH,
        QboStream::Invoice,
    );
    c.base_url = fake.url.clone();
    c.token_url = fake.token_url();
    c.page_size = 20;
    c.request_timeout = Duration::from_millis(500);
    c.retry = RequestRetry {
        // Enough for both bursts meeting one request back to back.
        attempts: 12,
        base: Duration::from_millis(1),
    };
    let source = QuickBooksSource::new(c, Arc::new(MemoryTokens::default())).expect("source");
    // A burst at the start, then more while the read pages.
    fake.with(|b| {
        b.fail_next = 2;
        b.throttle_next = 2;
        b.stall_next = 1;
        b.stall = Duration::from_secs(3);
        b.after_first_page = None;
    });
    let first = tokio::spawn({
        let s = source.clone();
        async move { read_invoices(&s).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.with(|b| {
        b.fail_next += 2;
        b.throttle_next += 2;
        b.stall_next += 1;
    });
    assert_eq!(first.await.expect("read"), 300, "every record once");
    let (stalled, throttled) = fake.with(|b| (b.stalled, b.throttled));
    assert!(stalled >= 2, "the held requests were met: {stalled}");
    assert!(throttled >= 4, "the 429 bursts were met: {throttled}");
}

#[tokio::test]
async fn quickbooks_lists_include_inactive_records_and_payments_keep_what_they_pay() {
    let dir = tempfile::tempdir().expect("tmp");
    let t = pacific_now();
    let customers: Vec<Value> = (1..=12)
        .map(|i| json!({ "Id": i.to_string(), "DisplayName": format!("Customer {i}"), "Active": i % 4 != 0,
                         "PrimaryEmailAddr": { "Address": format!("c{i}@example.com") },
                         "MetaData": { "LastUpdatedTime": t } }))
        .collect();
    let payments: Vec<Value> = (1..=5)
        .map(|i| json!({ "Id": format!("p{i}"), "TxnDate": "2026-10-15", "TotalAmt": money(10_000 + i),
                         "CustomerRef": { "value": "3" }, "CurrencyRef": { "value": "USD" },
                         "Line": [{ "Amount": money(10_000 + i), "LinkedTxn": [{ "TxnId": format!("{i}"), "TxnType": "Invoice" }] },
                                  { "Amount": money(0), "LinkedTxn": [{ "TxnId": "99", "TxnType": "CreditMemo" }] }],
                         "MetaData": { "LastUpdatedTime": t } }))
        .collect();
    // Credit memos have no due date and carry their open credit as Balance/RemainingCredit.
    let credit_memos: Vec<Value> = (1..=3)
        .map(|i| json!({ "Id": format!("cm{i}"), "DocNumber": format!("CM-{i}"), "TxnDate": "2026-10-05",
                         "CustomerRef": { "value": "3", "name": "Customer 3" }, "CurrencyRef": { "value": "EUR" },
                         "TotalAmt": money(2_500 * i), "Balance": money(1_000 * i), "RemainingCredit": money(1_000 * i),
                         "MetaData": { "LastUpdatedTime": t } }))
        .collect();
    // A voided invoice: zeroed, with "Voided" in its private note.
    let voided = vec![
        json!({ "Id": "77", "DocNumber": "INV-77", "TxnDate": "2026-10-01", "DueDate": "2026-10-31",
                              "CustomerRef": { "value": "3" }, "CurrencyRef": { "value": "USD" },
                              "TotalAmt": 0, "Balance": 0, "PrivateNote": "Voided",
                              "MetaData": { "LastUpdatedTime": t } }),
    ];
    let fake = FakeQbo::start(Books {
        records: HashMap::from([
            ("Customer".to_string(), customers),
            ("Payment".to_string(), payments),
            ("CreditMemo".to_string(), credit_memos),
            ("Invoice".to_string(), voided),
        ]),
        ..Books::default()
    })
    .await;
    let w = embedded(dir.path());
    let report = sync(
        &qbo_pipeline(
            dir.path(),
            "qbo-customers",
            &fake,
            "Customer",
            "customers",
            1000,
        ),
        &w,
    )
    .await
    .expect("customers");
    succeeded(&report);
    assert_eq!(
        report.ledger.counts.inserted, 12,
        "inactive customers are read too"
    );
    let customers_spec = qbo_pipeline(
        dir.path(),
        "qbo-customers",
        &fake,
        "Customer",
        "customers",
        1000,
    );
    let health =
        PipelineSource::for_pipeline(&customers_spec, w.clone(), &SourceReach::unrestricted())
            .expect("source")
            .check()
            .await
            .expect("check");
    assert!(
        health.detail.contains("12 Customer records"),
        "{}",
        health.detail
    );
    let report = sync(
        &qbo_pipeline(
            dir.path(),
            "qbo-payments",
            &fake,
            "Payment",
            "payments",
            1000,
        ),
        &w,
    )
    .await
    .expect("payments");
    succeeded(&report);
    let report = sync(
        &qbo_pipeline(
            dir.path(),
            "qbo-credits",
            &fake,
            "CreditMemo",
            "invoices",
            1000,
        ),
        &w,
    )
    .await
    .expect("credit memos");
    succeeded(&report);
    let report = sync(
        &qbo_pipeline(dir.path(), "qbo-voided", &fake, "Invoice", "invoices", 1000),
        &w,
    )
    .await
    .expect("voided invoice");
    succeeded(&report);
    let invoices = w.invoices(&acme()).await.expect("invoices");
    let credits: Vec<_> = invoices
        .iter()
        .filter(|i| i.kind == "credit_note")
        .collect();
    assert_eq!(credits.len(), 3);
    assert!(
        credits
            .iter()
            .all(|c| c.due_date == c.issue_date && c.currency == "EUR")
    );
    assert_eq!(
        credits.iter().map(|c| c.balance).sum::<Decimal>(),
        Decimal::new(6_000, 2)
    );
    let void = invoices
        .iter()
        .find(|i| i.external_id == "77")
        .expect("voided");
    assert_eq!(void.status, "void");

    let payments = w.payments(&acme()).await.expect("payments");
    assert_eq!(payments.len(), 5);
    let p1 = payments.iter().find(|p| p.external_id == "p1").expect("p1");
    assert_eq!(p1.applied_to, vec!["1".to_string()]);
    assert_eq!(p1.direction, "in");
    assert_eq!(p1.amount, Decimal::new(10_001, 2));
}

// --- Odoo ---

/// Journal entries: customer invoices and credit notes, vendor bills, drafts (never to be
/// read), cancelled ones; three currencies; partial residuals; shared write_dates.
fn odoo_moves(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = Rng::new(seed);
    (1..=n as i64)
        .map(|id| {
            let move_type = ["out_invoice", "out_invoice", "out_invoice", "out_refund", "in_invoice"][rng.below(5) as usize];
            let state = match rng.below(20) {
                0 => "draft",
                1 => "cancel",
                _ => "posted",
            };
            let total = 500 + rng.below(500_000) as i64;
            let residual = if rng.below(2) == 0 { total } else { total / 4 };
            let currency = CURRENCIES[rng.below(3) as usize];
            json!({
                "id": id,
                "name": if state == "draft" { json!("/") } else { json!(format!("INV/2026/{id:05}")) },
                "move_type": move_type,
                "state": state,
                "partner_id": [100 + id % 30, format!("Partner {}", id % 30)],
                "invoice_date": "2026-09-20",
                "invoice_date_due": if id % 10 == 0 { json!(false) } else { json!("2026-10-20") },
                "currency_id": [1 + rng.below(3) as i64, currency],
                "amount_total": money(total),
                "amount_residual": money(residual),
                "write_date": format!("2026-11-20 08:{:02}:{:02}", (id / 4) / 60 % 60, (id / 4) % 60),
            })
        })
        .collect()
}

fn odoo_expected(fake: &FakeOdoo) -> (usize, HashMap<String, (Decimal, Decimal)>) {
    fake.with(|d| {
        figures(
            d.records["account.move"]
                .iter()
                .filter(|m| {
                    m["state"] != "draft"
                        && m["move_type"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("out_"))
                })
                .map(|m| {
                    (
                        m["currency_id"][1].as_str().expect("cur").to_string(),
                        dec(&m["amount_total"]),
                        dec(&m["amount_residual"]),
                    )
                }),
        )
    })
}

fn odoo_pipeline(
    dir: &Path,
    name: &str,
    fake: &FakeOdoo,
    stream: &str,
    entity: &str,
    extra: &str,
) -> PipelineSpec {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ntenant = \"acme\"\nentity = \"{entity}\"\n[source]\nkind = \"odoo\"\nurl = \"{}\"\ndb = \"{}\"\nlogin = \"{}\"\napi_key = \"{}\"\nstream = \"{stream}\"\npage_size = 100\n{extra}",
            fake.url,
            odoo::DB,
            odoo::LOGIN,
            odoo::API_KEY
        ),
    )
    .expect("write");
    PipelineSpec::from_file(&path).expect("pipeline")
}

#[tokio::test]
async fn odoo_full_and_incremental_syncs_over_jsonrpc_and_json2_load_every_document_once() {
    for transport in ["jsonrpc", "json2"] {
        let dir = tempfile::tempdir().expect("tmp");
        let fake = FakeOdoo::start(Database {
            records: HashMap::from([("account.move".to_string(), odoo_moves(1_200, 5))]),
            ..Database::default()
        })
        .await;
        let w = embedded(dir.path());
        let spec = odoo_pipeline(
            dir.path(),
            "odoo-invoices",
            &fake,
            "invoices",
            "invoices",
            &format!("transport = \"{transport}\"\n"),
        );
        let first = sync(&spec, &w).await.expect("first sync");
        succeeded(&first);
        assert_eq!(
            warehouse_invoices(&w).await,
            odoo_expected(&fake),
            "{transport}"
        );
        let served = fake.with(|d| d.served.clone());
        assert!(
            served.iter().all(|(_, _, s)| s.as_deref() != Some("draft")),
            "drafts are filtered at the source"
        );
        let invoices = w.invoices(&acme()).await.expect("invoices");
        let cancelled = fake.with(|d| {
            d.records["account.move"]
                .iter()
                .filter(|m| {
                    m["state"] == "cancel"
                        && m["move_type"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("out_"))
                })
                .count()
        });
        assert_eq!(
            invoices.iter().filter(|i| i.status == "void").count(),
            cancelled
        );
        assert!(cancelled > 0 && invoices.iter().any(|i| i.kind == "credit_note"));

        // What the first run saw last, less the minute of margin the drafts check takes.
        let bound = fake.with(|d| {
            let last = d.records["account.move"]
                .iter()
                .filter(|m| {
                    m["state"] != "draft"
                        && m["move_type"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("out_"))
                })
                .filter_map(|m| m["write_date"].as_str())
                .max()
                .expect("documents")
                .to_string();
            let t =
                chrono::NaiveDateTime::parse_from_str(&last, "%Y-%m-%d %H:%M:%S").expect("time");
            (t - chrono::Duration::seconds(60))
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        });

        // 15 changed (one posted from draft), 10 new, one posted invoice reset to draft.
        fake.with(|d| {
            let moves = d.records.get_mut("account.move").expect("moves");
            let mut changed = 0;
            for m in moves
                .iter_mut()
                .filter(|m| m["state"] == "posted" && m["move_type"] == "out_invoice")
                .take(14)
            {
                m["amount_residual"] = money(0);
                m["write_date"] = json!("2026-11-21 09:00:00");
                changed += 1;
            }
            let draft = moves
                .iter_mut()
                .find(|m| m["state"] == "draft" && m["move_type"] == "out_invoice")
                .expect("a draft");
            draft["state"] = json!("posted");
            draft["name"] = json!("INV/2026/PROMOTED");
            draft["write_date"] = json!("2026-11-21 09:00:00");
            assert_eq!(changed, 14);
            let mut fresh = odoo_moves(10, 6);
            for (k, m) in fresh.iter_mut().enumerate() {
                m["id"] = json!(5_000 + k as i64);
                m["state"] = json!("posted");
                m["move_type"] = json!("out_invoice");
                m["write_date"] = json!("2026-11-21 09:00:00");
            }
            moves.extend(fresh);
            let reset = moves
                .iter_mut()
                .find(|m| {
                    m["state"] == "posted"
                        && m["move_type"] == "out_invoice"
                        && m["write_date"] != "2026-11-21 09:00:00"
                })
                .expect("a posted invoice");
            reset["state"] = json!("draft");
            reset["write_date"] = json!("2026-11-21 09:30:00");
        });
        // Drafts changed since the bound are checked by id (the reset one among them).
        let drafts = fake.with(|d| {
            d.records["account.move"]
                .iter()
                .filter(|m| {
                    m["state"] == "draft"
                        && m["move_type"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("out_"))
                        && m["write_date"]
                            .as_str()
                            .is_some_and(|w| w >= bound.as_str())
                })
                .count() as u64
        });
        let second = sync(&spec, &w).await.expect("second sync");
        succeeded(&second);
        let c = second.ledger.counts;
        assert_eq!(c.rows_read, 25 + drafts, "{transport}: {c:?}");
        assert_eq!(
            (c.inserted, c.updated, c.unchanged),
            (11, 15, drafts - 1),
            "{transport}: {c:?}"
        );
        assert_eq!(
            warehouse_invoices(&w).await,
            odoo_expected(&fake),
            "{transport}"
        );
    }
}

#[tokio::test]
async fn odoo_refused_credentials_are_permanent_and_unavailability_is_retried() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = FakeOdoo::start(Database {
        records: HashMap::from([("account.move".to_string(), odoo_moves(150, 7))]),
        fail_next: 2,
        ..Database::default()
    })
    .await;
    let w = embedded(dir.path());
    let spec = odoo_pipeline(dir.path(), "odoo-flaky", &fake, "bills", "bills", "");
    let report = sync(&spec, &w).await.expect("two 503s are retried");
    succeeded(&report);
    assert!(report.ledger.counts.inserted > 0);

    for transport in ["jsonrpc", "json2"] {
        let mut bad = odoo_pipeline(
            dir.path(),
            "odoo-bad",
            &fake,
            "bills",
            "bills",
            &format!("transport = \"{transport}\"\n"),
        );
        if let sluice_pipelines::spec::SourceSpec::Odoo(o) = &mut bad.source {
            o.api_key = "wrong".into();
        }
        let err = sync(&bad, &w).await.expect_err("refused");
        assert!(!err.is_transient(), "{transport}: {err}");
        assert!(
            err.to_string().contains("refused the login")
                || err.to_string().contains("Invalid apikey"),
            "{err}"
        );
    }
}

/// Bursts of a 503, a 429 and a request held past the client's timeout, on both
/// transports: the synced figures equal those of a sync that met no fault.
#[tokio::test]
async fn odoo_bursts_of_5xx_429_and_timeouts_lose_no_record() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = FakeOdoo::start(Database {
        records: HashMap::from([("account.move".to_string(), odoo_moves(150, 8))]),
        stall: Duration::from_secs(3),
        ..Database::default()
    })
    .await;
    let clean = embedded(&dir.path().join("clean"));
    let spec = odoo_pipeline(dir.path(), "odoo", &fake, "invoices", "invoices", "");
    succeeded(&sync(&spec, &clean).await.expect("clean sync"));
    let expected = warehouse_invoices(&clean).await;
    assert!(expected.0 > 0);
    for transport in ["jsonrpc", "json2"] {
        let w = embedded(&dir.path().join(transport));
        let spec = odoo_pipeline(
            dir.path(),
            "odoo",
            &fake,
            "invoices",
            "invoices",
            &format!("transport = \"{transport}\"\nrequest_timeout_secs = 1\n"),
        );
        fake.with(|d| {
            d.fail_next = 1;
            d.throttle_next = 1;
            d.stall_next = 1;
        });
        let report = sync(&spec, &w).await.expect("the bursts are retried");
        succeeded(&report);
        assert_eq!(warehouse_invoices(&w).await, expected, "{transport}");
        let (stalled, throttled, failing) = fake.with(|d| {
            (
                d.stalled,
                d.throttled,
                d.fail_next + d.throttle_next + d.stall_next,
            )
        });
        assert_eq!(failing, 0, "{transport}: every injected fault was met");
        assert!(stalled >= 1 && throttled >= 1);
    }
}

#[tokio::test]
async fn odoo_payments_cancelled_later_are_deleted_and_archived_partners_are_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let payments: Vec<Value> = (1..=40i64)
        .map(|id| json!({ "id": id, "payment_type": if id % 4 == 0 { "outbound" } else { "inbound" },
                           "state": "posted", "partner_id": [200 + id % 5, "P"], "date": "2026-11-02",
                           "amount": money(5_000 + id), "currency_id": [1, "EUR"],
                           "reconciled_invoice_ids": [id * 10], "reconciled_bill_ids": [],
                           "write_date": "2026-11-20 10:00:00" }))
        .collect();
    let partners: Vec<Value> = (1..=9i64)
        .map(|id| json!({ "id": id, "name": format!("Partner {id}"), "email": if id == 1 { json!(false) } else { json!(format!("p{id}@x.test")) },
                           "active": id % 3 != 0, "customer_rank": 1, "supplier_rank": 0,
                           "write_date": "2026-11-20 10:00:00" }))
        .collect();
    let fake = FakeOdoo::start(Database {
        records: HashMap::from([
            ("account.payment".to_string(), payments),
            ("res.partner".to_string(), partners),
        ]),
        ..Database::default()
    })
    .await;
    let w = embedded(dir.path());
    let customers = sync(
        &odoo_pipeline(
            dir.path(),
            "odoo-customers",
            &fake,
            "customers",
            "customers",
            "",
        ),
        &w,
    )
    .await
    .expect("customers");
    succeeded(&customers);
    assert_eq!(
        customers.ledger.counts.inserted, 9,
        "archived partners are read too"
    );
    let health = PipelineSource::for_pipeline(
        &odoo_pipeline(
            dir.path(),
            "odoo-customers",
            &fake,
            "customers",
            "customers",
            "",
        ),
        w.clone(),
        &SourceReach::unrestricted(),
    )
    .expect("source")
    .check()
    .await
    .expect("check");
    assert!(
        health.detail.contains("9 res.partner records"),
        "{}",
        health.detail
    );

    let spec = odoo_pipeline(
        dir.path(),
        "odoo-payments",
        &fake,
        "payments",
        "payments",
        "",
    );
    succeeded(&sync(&spec, &w).await.expect("payments"));
    let loaded = w.payments(&acme()).await.expect("payments");
    assert_eq!(loaded.len(), 40);
    let p4 = loaded.iter().find(|p| p.external_id == "4").expect("p4");
    assert_eq!(
        (p4.direction.as_str(), p4.applied_to.clone()),
        ("out", vec!["40".to_string()])
    );

    fake.with(|d| {
        for p in d
            .records
            .get_mut("account.payment")
            .expect("payments")
            .iter_mut()
            .take(5)
        {
            p["state"] = json!("cancel");
            p["write_date"] = json!("2026-11-21 11:00:00");
        }
    });
    let second = sync(&spec, &w).await.expect("second");
    succeeded(&second);
    assert_eq!(
        (second.ledger.counts.rows_read, second.ledger.counts.updated),
        (5, 5)
    );
    let loaded = w.payments(&acme()).await.expect("payments");
    assert_eq!(loaded.len(), 35, "cancelled payments no longer count");
    let sum: Decimal = loaded.iter().map(|p| p.amount).sum();
    assert_eq!(
        sum,
        (6..=40)
            .map(|i| Decimal::new(5_000 + i, 2))
            .sum::<Decimal>()
    );
}

#[tokio::test]
async fn quickbooks_limits_are_shared_by_workers_through_redis() {
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(200, 8))]),
        latency: Duration::from_millis(30),
        ..Books::default()
    })
    .await;
    // The company's limits, as the fake enforces them.
    fake.enforce(15, Duration::from_secs(1), 2);
    let limits = Limits {
        requests: 15,
        window: Duration::from_secs(1),
        concurrent: 2,
    };
    let redis = support::redis::Prefix::new();
    // Three "worker processes": each its own Redis connection and source; one company, and
    // one control store keeping its refresh token.
    let tokens = Arc::new(MemoryTokens::default());
    let mut readers = Vec::new();
    for _ in 0..3 {
        let locks = sluice_workers::coord::RedisLocks::connect(&redis.url, &redis.prefix)
            .await
            .expect("redis");
        let gate = sluice_workers::rate_gate::RedisGate::new(
            locks.connection(),
            &redis.prefix,
            &format!("quickbooks {} {}", fake.url, qbo::REALM),
            limits,
        );
        let mut c = QuickBooksConfig::new(
            qbo::REALM,
            qbo::CLIENT_ID,
            qbo::CLIENT_SECRET,
            qbo::FIRST_REFRESH,
            QboStream::Invoice,
        );
        c.base_url = fake.url.clone();
        c.token_url = fake.token_url();
        c.page_size = 20;
        readers.push(
            QuickBooksSource::new(c, tokens.clone())
                .expect("source")
                .with_gate(Arc::new(gate)),
        );
    }
    let counts = futures_util::future::join_all(readers.iter().map(read_invoices)).await;
    assert_eq!(counts, vec![200, 200, 200]);
    let (over, requests) = fake.with(|b| (b.over_limit, b.requests));
    assert_eq!(
        over, 0,
        "together the workers went over the limits ({requests} requests)"
    );
    assert!(requests >= 33, "{requests}");
}

#[tokio::test]
async fn quickbooks_a_resumed_first_run_still_sees_deletions_made_while_it_was_interrupted() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(300, 9))]),
        // The connection is revoked right after the first page: the run fails after one
        // committed batch.
        after_first_page: Some(Box::new(|b: &mut Books| {
            b.refresh_token = String::new();
            b.access.clear();
        })),
        ..Books::default()
    })
    .await;
    let w = embedded(dir.path());
    let spec = qbo_pipeline(dir.path(), "qbo-resumed", &fake, "Invoice", "invoices", 100);
    let err = sync(&spec, &w).await.expect_err("revoked mid-run");
    assert!(err.to_string().contains("invalid_grant"), "{err}");
    assert_eq!(w.invoices(&acme()).await.expect("invoices").len(), 100);

    // Reconnected (the saved token works again); meanwhile invoice 1 was deleted.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.with(|b| {
        b.refresh_token = format!("rt-{}", b.refresh_serial);
        let invoices = b.records.get_mut("Invoice").expect("invoices");
        let gone = invoices.remove(0);
        let id = gone["Id"].as_str().expect("id").to_string();
        b.deleted
            .entry("Invoice".into())
            .or_default()
            .push((id, pacific_now()));
    });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resumed = sync(&spec, &w).await.expect("resumed run");
    succeeded(&resumed);
    assert_eq!(
        resumed.ledger.counts.rows_read, 200,
        "{:?}",
        resumed.ledger.counts
    );

    // The next run asks for deletions from when the first attempt started.
    let next = sync(&spec, &w).await.expect("next run");
    succeeded(&next);
    assert_eq!(next.ledger.counts.updated, 1, "{:?}", next.ledger.counts);
    assert_eq!(warehouse_invoices(&w).await, qbo_figures(&fake));
}

#[tokio::test]
async fn a_health_read_does_not_refresh_the_quickbooks_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = FakeQbo::start(Books {
        records: HashMap::from([("Invoice".to_string(), qbo_invoices(3, 1))]),
        ..Books::default()
    })
    .await;
    let w = embedded(dir.path());
    let spec = qbo_pipeline(dir.path(), "qbo-health", &fake, "Invoice", "invoices", 100);
    let source = || {
        PipelineSource::for_pipeline(&spec, w.clone(), &SourceReach::unrestricted())
            .expect("source")
    };
    // What the API's health route does: the service answers, no token is spent.
    let read = source().for_health_read().check().await.expect("health");
    assert!(read.detail.contains("HTTP 401"), "{}", read.detail);
    assert_eq!(fake.with(|b| b.refreshes), 0);
    // The CLI's `source check` tries the credentials: one refresh.
    let full = source().check().await.expect("check");
    assert!(full.detail.contains("3 Invoice records"), "{}", full.detail);
    assert_eq!(fake.with(|b| b.refreshes), 1);
}
