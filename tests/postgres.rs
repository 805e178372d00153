//! The PostgreSQL warehouse against a real server: tenant isolation, the commit fence under
//! racing runs, a connection killed mid-batch, encrypted secrets, and equality with the
//! embedded SQLite warehouse.

mod support;

use sluice_engine::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rust_decimal::Decimal;
use sluice_connectors::{BatchStream, HealthReport, ReadRequest, Source, SourceError, StreamInfo};
use sluice_engine::control::PipelineStore;
use sluice_engine::finance_rules::AgingSide;
use sluice_engine::quarantine::QuarantineFilter;
use sluice_engine::secrets::MasterKey;
use sluice_engine::warehouse::{FaultHook, FaultPoint, PostgresWarehouse};
use sluice_engine::{ErrorKind, RunStatus, SqliteWarehouse, TenantSlug, Warehouse};
use sluice_pipelines::{
    PipelineErrorKind, PipelineSource, PipelineSpec, Quiet, RunOptions, run_pipeline,
};
use sqlx::{Connection, PgConnection};
use support::messy_invoices;
use support::pg::{MASTER_KEY_HEX, TestDb};

fn master() -> MasterKey {
    MasterKey::from_hex(MASTER_KEY_HEX).expect("key")
}

fn slug(s: &str) -> TenantSlug {
    TenantSlug::parse(s).expect("slug")
}

fn pipeline(dir: &Path, tenant: &str, name: &str, csv: &str, batch_rows: usize) -> PipelineSpec {
    let file = dir.join(format!("{tenant}-{name}.csv"));
    std::fs::write(&file, csv).expect("csv");
    let path = dir.join(format!("{tenant}-{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ntenant = \"{tenant}\"\nentity = \"invoices\"\nbatch_rows = {batch_rows}\n[source]\nkind = \"csv\"\npath = \"{}\"\n",
            file.file_name().and_then(|f| f.to_str()).expect("name")
        ),
    )
    .expect("toml");
    PipelineSpec::from_file(&path).expect("spec")
}

async fn warehouse_with(db: &TestDb, tenants: &[&str]) -> PostgresWarehouse {
    let w = PostgresWarehouse::connect(&db.url).await.expect("connect");
    for t in tenants {
        w.create_tenant(&slug(t), t, &master())
            .await
            .expect("create tenant");
    }
    w
}

async fn sums(w: &impl Warehouse, tenant: &str) -> (usize, HashMap<String, Decimal>) {
    let invoices = w.invoices(&slug(tenant)).await.expect("invoices");
    let mut by = HashMap::new();
    for i in &invoices {
        *by.entry(i.currency.clone()).or_insert(Decimal::ZERO) += i.total;
    }
    (invoices.len(), by)
}

fn expected_sums(exp: &support::Expected) -> HashMap<String, Decimal> {
    exp.sum_of_totals()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[tokio::test]
async fn tenants_never_see_each_other_whatever_the_names() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = warehouse_with(&db, &["alpha", "beta"]).await;
    let header = "external_id,issue_date,due_date,currency,total,balance\n";
    let a = pipeline(
        dir.path(),
        "alpha",
        "invoices",
        &format!(
            "{header}A-1,2024-01-01,2024-01-31,USD,10.00,10.00\nA-2,2024-01-01,2024-01-31,USD,20.00,0\nBAD,2024-01-01,2023-01-01,USD,1.00,1.00\n"
        ),
        100,
    );
    let b = pipeline(
        dir.path(),
        "beta",
        "invoices",
        &format!("{header}B-1,2024-01-01,2024-01-31,EUR,99.00,99.00\n"),
        100,
    );
    let ra = run_pipeline(
        &a,
        &PipelineSource::from_spec(
            &a.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        &w,
        &RunOptions::default(),
        &Quiet,
    )
    .await
    .expect("alpha");
    let rb = run_pipeline(
        &b,
        &PipelineSource::from_spec(
            &b.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        &w,
        &RunOptions::default(),
        &Quiet,
    )
    .await
    .expect("beta");

    let ids = |v: Vec<sluice_engine::entity::Invoice>| {
        v.into_iter().map(|i| i.external_id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(w.invoices(&slug("alpha")).await.expect("a")),
        ["A-1", "A-2"]
    );
    assert_eq!(ids(w.invoices(&slug("beta")).await.expect("b")), ["B-1"]);
    assert_eq!(
        w.quarantined(&slug("alpha"), &QuarantineFilter::default())
            .await
            .expect("q")
            .len(),
        1
    );
    assert!(
        w.quarantined(&slug("beta"), &QuarantineFilter::default())
            .await
            .expect("q")
            .is_empty()
    );
    assert!(
        w.run(&slug("alpha"), &rb.ledger.run_id)
            .await
            .expect("lookup")
            .is_none(),
        "beta's run is invisible to alpha"
    );
    assert!(
        w.run(&slug("beta"), &ra.ledger.run_id)
            .await
            .expect("lookup")
            .is_none()
    );
    let aging = w
        .aging(
            &slug("alpha"),
            AgingSide::Receivable,
            "2024-06-30".parse().expect("date"),
        )
        .await
        .expect("aging");
    assert!(
        !aging.currencies.contains_key("EUR"),
        "beta's EUR invoice never reaches alpha's figures"
    );

    // Everything a tenant's data lives in is inside its own schema.
    let mut conn = db.connect().await;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_name IN ('invoices','quarantine','runs') ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .expect("catalog");
    let schemas: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    assert!(
        schemas
            .iter()
            .all(|s| *s == "tenant_alpha" || *s == "tenant_beta" || *s == "sluice"),
        "{tables:?}"
    );
    assert_eq!(
        tables.iter().filter(|(s, _)| s == "tenant_alpha").count(),
        3
    );
}

#[tokio::test]
async fn missing_tenants_and_hostile_names_are_rejected_and_create_nothing() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = warehouse_with(&db, &["acme"]).await;
    let count_schemas = || async {
        let mut conn = PgConnection::connect(&db.url).await.expect("conn");
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tenant_%'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("count")
    };
    assert_eq!(count_schemas().await, 1);

    let spec = pipeline(
        dir.path(),
        "ghost",
        "invoices",
        "external_id,issue_date,due_date,currency,total,balance\n",
        10,
    );
    let err = run_pipeline(
        &spec,
        &PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        &w,
        &RunOptions::default(),
        &Quiet,
    )
    .await
    .expect_err("no such tenant");
    assert_eq!(err.kind(), PipelineErrorKind::Engine(ErrorKind::NotFound));
    assert!(
        err.message().contains("sluice tenant create ghost"),
        "{err}"
    );

    for bad in [
        "acme\"; DROP SCHEMA sluice; --",
        "Acme",
        "a b",
        "tenant-x",
        "x",
    ] {
        assert!(TenantSlug::parse(bad).is_err(), "{bad:?} accepted");
    }
    let err = w
        .create_tenant(&slug("acme"), "again", &master())
        .await
        .expect_err("duplicate");
    assert!(err.message().contains("already exists"));
    let hostile = "name = \"x'; DROP TABLE invoices; --\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"csv\"\npath = \"a.csv\"\n";
    assert!(PipelineSpec::from_toml(hostile).is_err());
    assert_eq!(count_schemas().await, 1, "nothing was created");
    assert!(
        w.migrate_all().await.expect("migrate").is_empty(),
        "already at the latest version"
    );
}

#[tokio::test]
async fn pipeline_secrets_are_encrypted_at_rest() {
    let db = TestDb::create().await;
    let w = warehouse_with(&db, &["acme"])
        .await
        .with_master_key(master());
    let spec = serde_json::json!({ "name": "erp", "source": { "kind": "postgres", "url": "postgres://erp@db/erp" } });
    let mut secrets = serde_json::Map::new();
    secrets.insert("password".into(), "correct-horse-battery-staple".into());
    w.save_pipeline(
        &slug("acme"),
        "erp",
        &spec,
        &secrets,
        &sluice_engine::control::PipelineChange::shell_register(serde_json::json!({})),
    )
    .await
    .expect("store");

    let mut conn = db.connect().await;
    let (stored_spec, sealed): (String, Vec<u8>) = sqlx::query_as(
        "SELECT spec::text, secrets FROM sluice.pipelines WHERE tenant = 'acme' AND name = 'erp'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("row");
    assert!(!stored_spec.contains("correct-horse"));
    assert!(
        !sealed.windows(13).any(|w| w == b"correct-horse"),
        "secret stored in clear"
    );
    let audit: String =
        sqlx::query_scalar("SELECT string_agg(detail::text, ' ') FROM sluice.audit_log")
            .fetch_one(&mut conn)
            .await
            .expect("audit");
    assert!(
        !audit.contains("correct-horse"),
        "secret in the audit log: {audit}"
    );

    let back = w
        .pipeline(&slug("acme"), "erp")
        .await
        .expect("load")
        .expect("present");
    assert_eq!(back.spec, spec);
    assert_eq!(back.secrets["password"], "correct-horse-battery-staple");
    assert!(!format!("{back:?}").contains("correct-horse"));
    let wrong = MasterKey::from_hex(&MASTER_KEY_HEX.replace('4', "5")).expect("key");
    let other = PostgresWarehouse::connect(&db.url)
        .await
        .expect("connect")
        .with_master_key(wrong);
    let err = other
        .pipeline(&slug("acme"), "erp")
        .await
        .expect_err("wrong master key");
    assert!(!err.to_string().contains("correct-horse"));
    let keyless = PostgresWarehouse::connect(&db.url).await.expect("connect");
    let err = keyless
        .pipeline(&slug("acme"), "erp")
        .await
        .expect_err("no master key");
    assert!(err.to_string().contains("SLUICE_MASTER_KEY"), "{err}");
}

/// A source that waits until every racer has read its stream state before yielding.
struct Gated {
    inner: PipelineSource,
    gate: Arc<tokio::sync::Barrier>,
}

impl Source for Gated {
    async fn streams(&self) -> Result<Vec<StreamInfo>, SourceError> {
        self.inner.streams().await
    }
    async fn check(&self) -> Result<HealthReport, SourceError> {
        self.inner.check().await
    }
    async fn read(&self, request: ReadRequest) -> Result<BatchStream, SourceError> {
        self.gate.wait().await;
        self.inner.read(request).await
    }
}

#[tokio::test]
async fn two_racing_runs_one_commits_the_other_stops_at_the_fence() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = warehouse_with(&db, &["acme"]).await;
    let (csv, exp) = messy_invoices(6_000, 5);
    let spec = pipeline(dir.path(), "acme", "race", &csv, 500);
    let gate = Arc::new(tokio::sync::Barrier::new(2));
    let a = Gated {
        inner: PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        gate: gate.clone(),
    };
    let b = Gated {
        inner: PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source"),
        gate,
    };
    let options = RunOptions::default();
    let (ra, rb) = tokio::join!(
        run_pipeline(&spec, &a, &w, &options, &Quiet),
        run_pipeline(&spec, &b, &w, &options, &Quiet)
    );
    let (winner, loser) = match (ra, rb) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        (Ok(_), Ok(_)) => panic!("both runs committed"),
        (Err(a), Err(b)) => panic!("both runs failed: {a} / {b}"),
    };
    assert_eq!(
        loser.kind(),
        PipelineErrorKind::Engine(ErrorKind::Fenced),
        "{loser}"
    );
    assert!(!loser.is_transient());
    let lost = w
        .run(&slug("acme"), loser.run_id().expect("id"))
        .await
        .expect("ledger")
        .expect("recorded");
    assert_eq!(lost.status, RunStatus::Failed);
    assert_eq!(lost.counts.rows_read, 0, "the fenced run committed nothing");
    assert_eq!(winner.ledger.counts.rows_read, exp.rows_read);
    assert_eq!(winner.ledger.counts.inserted, exp.loaded);
    let (n, s) = sums(&w, "acme").await;
    assert_eq!(n as u64, exp.loaded);
    assert_eq!(s, expected_sums(&exp));
}

#[tokio::test]
async fn a_connection_killed_mid_batch_rolls_back_and_the_rerun_loses_nothing() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let url = db.url.clone();
    let hook: FaultHook = Arc::new(move |p: FaultPoint| {
        let url = url.clone();
        Box::pin(async move {
            if p.name == "after_copy" && p.commit == 3 {
                let mut admin = PgConnection::connect(&url).await.expect("admin connection");
                let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                    .bind(p.backend_pid)
                    .fetch_one(&mut admin)
                    .await
                    .expect("terminate");
            }
        })
    });
    let w = warehouse_with(&db, &["acme"]).await.with_fault_hook(hook);
    let (csv, exp) = messy_invoices(5_000, 17);
    let spec = pipeline(dir.path(), "acme", "killed", &csv, 1000);
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");

    let err = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect_err("connection killed");
    assert!(
        err.is_transient(),
        "a lost connection is worth retrying: {err}"
    );
    let failed = w
        .run(&slug("acme"), err.run_id().expect("id"))
        .await
        .expect("ledger")
        .expect("recorded");
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(
        failed.counts.rows_read, 2000,
        "batches 1-2 committed, batch 3 rolled back"
    );
    let (n, _) = sums(&w, "acme").await;
    assert!(n < exp.loaded as usize);

    let rerun = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("rerun");
    assert_eq!(
        rerun.ledger.counts.rows_read,
        exp.rows_read - 2000,
        "resumed after batch 2"
    );
    let (n, s) = sums(&w, "acme").await;
    assert_eq!(n as u64, exp.loaded);
    assert_eq!(s, expected_sums(&exp));
    let q = w
        .quarantined(
            &slug("acme"),
            &QuarantineFilter {
                limit: Some(10_000),
                ..Default::default()
            },
        )
        .await
        .expect("q");
    assert_eq!(q.len() as u64, exp.quarantined);
}

#[tokio::test]
async fn sqlite_and_postgres_hold_identical_content_and_accounting() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let pg = warehouse_with(&db, &["acme"]).await;
    let lite = SqliteWarehouse::new(dir.path().join("data"));
    let (csv, _) = messy_invoices(7_000, 41);
    let spec = pipeline(dir.path(), "acme", "same", &csv, 800);
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    for round in 0..2 {
        let a = run_pipeline(&spec, &source, &lite, &RunOptions::default(), &Quiet)
            .await
            .expect("sqlite");
        let b = run_pipeline(&spec, &source, &pg, &RunOptions::default(), &Quiet)
            .await
            .expect("postgres");
        assert_eq!(a.ledger.counts, b.ledger.counts, "round {round}");
        assert_eq!(a.ledger.rules_hash, b.ledger.rules_hash);
    }
    let bills =
        PipelineSpec::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bills.toml"))
            .expect("bills");
    let bills_source = PipelineSource::from_spec(
        &bills.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    let a = run_pipeline(&bills, &bills_source, &lite, &RunOptions::default(), &Quiet)
        .await
        .expect("sqlite bills");
    let b = run_pipeline(&bills, &bills_source, &pg, &RunOptions::default(), &Quiet)
        .await
        .expect("pg bills");
    assert_eq!(a.ledger.counts, b.ledger.counts);

    let t = slug("acme");
    assert_eq!(
        lite.invoices(&t).await.expect("l"),
        pg.invoices(&t).await.expect("p")
    );
    assert_eq!(
        lite.bills(&t).await.expect("l"),
        pg.bills(&t).await.expect("p")
    );
    let q = |rows: Vec<sluice_engine::quarantine::QuarantinedRow>| {
        let mut v: Vec<(String, u64, String, String)> = rows
            .into_iter()
            .map(|r| {
                (
                    r.pipeline,
                    r.position.row,
                    serde_json::to_string(&r.raw).unwrap_or_default(),
                    serde_json::to_string(&r.errors).unwrap_or_default(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let all = QuarantineFilter {
        limit: Some(100_000),
        ..Default::default()
    };
    assert_eq!(
        q(lite.quarantined(&t, &all).await.expect("l")),
        q(pg.quarantined(&t, &all).await.expect("p"))
    );
    for rule in [
        "currency_code",
        "balance_within_total",
        "ragged_row",
        "no_such_rule",
    ] {
        let filter = QuarantineFilter {
            rule: Some(rule.into()),
            limit: Some(100_000),
            ..Default::default()
        };
        let (l, p) = (
            lite.quarantined(&t, &filter).await.expect("l"),
            pg.quarantined(&t, &filter).await.expect("p"),
        );
        assert!(
            l.iter().all(|r| r.errors.iter().any(|e| e.rule == rule)),
            "{rule}"
        );
        assert_eq!(l.is_empty(), rule == "no_such_rule", "{rule}");
        assert_eq!(q(l), q(p), "filtered by {rule}");
    }
    let pending = QuarantineFilter {
        status: Some(sluice_engine::quarantine::QuarantineStatus::Pending),
        limit: Some(3),
        ..Default::default()
    };
    assert_eq!(lite.quarantined(&t, &pending).await.expect("l").len(), 3);
    assert_eq!(pg.quarantined(&t, &pending).await.expect("p").len(), 3);
    for as_of in ["2024-02-15", "2024-06-30"] {
        let d = as_of.parse().expect("date");
        for side in [AgingSide::Receivable, AgingSide::Payable] {
            let (l, p) = (
                lite.aging(&t, side, d).await.expect("l"),
                pg.aging(&t, side, d).await.expect("p"),
            );
            assert_eq!(
                serde_json::to_string(&l).expect("json"),
                serde_json::to_string(&p).expect("json")
            );
        }
    }
}

#[tokio::test]
async fn amounts_dates_and_id_lists_survive_the_binary_copy_exactly() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let pg = warehouse_with(&db, &["acme"]).await;
    let lite = SqliteWarehouse::new(dir.path().join("data"));
    let amounts = [
        "0",
        "0.0001",
        "0.01",
        "1",
        "9999.9999",
        "10000",
        "10000.0001",
        "100000000",
        "12345678901234.5678",
        "99999999999999.9999",
    ];
    let mut csv =
        String::from("external_id,issue_date,due_date,currency,total,balance,kind,updated_at\n");
    for (i, a) in amounts.iter().enumerate() {
        csv.push_str(&format!(
            "A{i},1999-12-31,2000-01-01,JPY,{a},{a},credit_note,1969-07-20T20:17:40.123456Z\n"
        ));
    }
    csv.push_str("LEAP,2024-02-29,2096-02-29,USD,5.00,0,invoice,2038-01-19T03:14:08Z\n");
    let spec = pipeline(dir.path(), "acme", "amounts", &csv, 4);
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    run_pipeline(&spec, &source, &pg, &RunOptions::default(), &Quiet)
        .await
        .expect("pg");
    run_pipeline(&spec, &source, &lite, &RunOptions::default(), &Quiet)
        .await
        .expect("sqlite");
    let stored = pg.invoices(&slug("acme")).await.expect("invoices");
    for (i, a) in amounts.iter().enumerate() {
        let inv = stored
            .iter()
            .find(|x| x.external_id == format!("A{i}"))
            .expect("row");
        assert_eq!(inv.total, a.parse::<Decimal>().expect("decimal"), "A{i}");
    }
    assert_eq!(
        stored,
        lite.invoices(&slug("acme")).await.expect("sqlite invoices")
    );

    let payments = "external_id,direction,date,amount,currency,applied_to\nP1,in,2024-05-01,12.34,EUR,\"INV-1; INV-\"\"2\"\"\"\nP2,out,2024-05-02,0.0001,EUR,\n";
    std::fs::write(dir.path().join("p.csv"), payments).expect("csv");
    std::fs::write(dir.path().join("p.toml"), "name = \"pay\"\ntenant = \"acme\"\nentity = \"payments\"\n[source]\nkind = \"csv\"\npath = \"p.csv\"\n").expect("toml");
    let pspec = PipelineSpec::from_file(&dir.path().join("p.toml")).expect("spec");
    let psource = PipelineSource::from_spec(
        &pspec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    run_pipeline(&pspec, &psource, &pg, &RunOptions::default(), &Quiet)
        .await
        .expect("pg payments");
    run_pipeline(&pspec, &psource, &lite, &RunOptions::default(), &Quiet)
        .await
        .expect("sqlite payments");
    let p = pg.payments(&slug("acme")).await.expect("payments");
    assert_eq!(p[0].applied_to, ["INV-1", "INV-\"2\""]);
    assert_eq!(
        p,
        lite.payments(&slug("acme")).await.expect("sqlite payments")
    );
}

#[tokio::test]
async fn dead_letters_are_kept_per_tenant_and_replayed_once() {
    let db = TestDb::create().await;
    let w = warehouse_with(&db, &["acme", "globex"]).await;
    let letter = sluice_engine::control::DeadLetter {
        id: "dl-1".into(),
        tenant: "acme".into(),
        pipeline: "inv".into(),
        job_kind: "sync".into(),
        job: serde_json::json!({ "tenant": "acme", "pipeline": "inv" }),
        attempts: serde_json::json!([{ "number": 1, "error": "connection reset", "transient": true }]),
        reason: "all 5 attempts failed".into(),
        created_at: chrono::Utc::now(),
        replayed_at: None,
        replay_run: None,
    };
    w.record_dead_letter(&letter).await.expect("record");
    let listed = w.dead_letters(&slug("acme"), 10).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].attempts, letter.attempts);
    assert!(
        w.dead_letters(&slug("globex"), 10)
            .await
            .expect("list")
            .is_empty(),
        "per tenant"
    );
    assert!(
        w.dead_letter(&slug("globex"), "dl-1")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        w.mark_dead_letter_replayed(&slug("acme"), "dl-1", "run-9")
            .await
            .expect("mark")
    );
    assert!(
        !w.mark_dead_letter_replayed(&slug("acme"), "dl-1", "run-10")
            .await
            .expect("mark"),
        "once"
    );
    let got = w
        .dead_letter(&slug("acme"), "dl-1")
        .await
        .expect("get")
        .expect("present");
    assert_eq!(got.replay_run.as_deref(), Some("run-9"));
}

#[tokio::test]
async fn migrated_tables_have_exactly_the_entity_columns() {
    let db = TestDb::create().await;
    let w = warehouse_with(&db, &["cols"]).await;
    for entity in sluice_engine::Entity::ALL {
        let mut stored: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'tenant_cols' AND table_name = $1",
        )
        .bind(entity.name())
        .fetch_all(w.pool())
        .await
        .expect("columns");
        let mut expected: Vec<String> = entity
            .table_columns()
            .iter()
            .map(|c| c.to_string())
            .collect();
        stored.sort();
        expected.sort();
        assert_eq!(stored, expected, "table {entity}");
    }
}

/// A replay killed at any of its commits leaves every row either loaded and marked
/// replayed, or neither: the rows and their quarantine entries commit together.
#[tokio::test]
async fn a_replay_killed_at_any_commit_never_loads_a_row_it_leaves_open() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tmp");
    let url = db.url.clone();
    // 0: disarmed; k: terminate the backend at the k-th commit point from now on.
    let kill_at = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let (k, n) = (kill_at.clone(), seen.clone());
    let hook: FaultHook = Arc::new(move |p: FaultPoint| {
        let (url, k, n) = (url.clone(), k.clone(), n.clone());
        Box::pin(async move {
            let armed = k.load(Ordering::SeqCst);
            if armed == 0 || p.name != "before_commit" {
                return;
            }
            if n.fetch_add(1, Ordering::SeqCst) + 1 == armed {
                let mut admin = PgConnection::connect(&url).await.expect("admin connection");
                let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                    .bind(p.backend_pid)
                    .fetch_one(&mut admin)
                    .await
                    .expect("terminate");
            }
        })
    });
    let w = warehouse_with(&db, &["acme"]).await.with_fault_hook(hook);
    let (csv, _) = messy_invoices(3_000, 23);
    let mut spec = pipeline(dir.path(), "acme", "replayed", &csv, 1000);
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("first run");
    let tenant = slug("acme");
    let bad_currency = w
        .quarantined(
            &tenant,
            &QuarantineFilter {
                rule: Some("currency_code".into()),
                limit: Some(1000),
                ..QuarantineFilter::default()
            },
        )
        .await
        .expect("quarantine");
    assert!(bad_currency.len() > 4, "{}", bad_currency.len());
    for row in &bad_currency {
        let mut raw = row.raw.clone();
        raw.insert("currency".into(), "USD".into());
        w.fix_quarantined(&tenant, &row.id, &raw)
            .await
            .expect("fix")
            .expect("open");
    }
    // Several replay batches, so that commits come one after another.
    spec.batch_rows = Some(2);
    for (_, loaded) in replay_states(&w, &tenant, &bad_currency).await {
        assert!(!loaded, "a fixed row is not loaded before its replay");
    }
    for point in 1..=3 {
        let open: Vec<_> = replay_states(&w, &tenant, &bad_currency)
            .await
            .into_iter()
            .filter(|(r, _)| r.status.as_str() == "fixed")
            .map(|(r, _)| r)
            .collect();
        seen.store(0, Ordering::SeqCst);
        kill_at.store(point, Ordering::SeqCst);
        let killed =
            sluice_pipelines::replay::replay_quarantined(&spec, &w, &open, &RunOptions::default())
                .await;
        kill_at.store(0, Ordering::SeqCst);
        assert!(
            killed.is_err(),
            "commit point {point} was reached and killed"
        );
        for (row, loaded) in replay_states(&w, &tenant, &bad_currency).await {
            assert_eq!(
                loaded,
                row.status.as_str() == "replayed",
                "after a kill at commit point {point}, row {} is {} and {}loaded",
                row.id,
                row.status.as_str(),
                if loaded { "" } else { "not " }
            );
        }
    }
    let open: Vec<_> = replay_states(&w, &tenant, &bad_currency)
        .await
        .into_iter()
        .filter(|(r, _)| r.status.as_str() == "fixed")
        .map(|(r, _)| r)
        .collect();
    sluice_pipelines::replay::replay_quarantined(&spec, &w, &open, &RunOptions::default())
        .await
        .expect("the replay without a fault");
    for (row, loaded) in replay_states(&w, &tenant, &bad_currency).await {
        assert!(loaded && row.status.as_str() == "replayed", "{}", row.id);
    }
}

/// Per quarantined row: its state now, and whether its external id is loaded.
async fn replay_states(
    w: &PostgresWarehouse,
    tenant: &TenantSlug,
    rows: &[sluice_engine::quarantine::QuarantinedRow],
) -> Vec<(sluice_engine::quarantine::QuarantinedRow, bool)> {
    let ids: std::collections::HashSet<String> = w
        .invoices(tenant)
        .await
        .expect("invoices")
        .into_iter()
        .map(|i| i.external_id)
        .collect();
    let mut out = Vec::new();
    for r in rows {
        let now = w
            .quarantined_row(tenant, &r.id)
            .await
            .expect("row")
            .expect("row");
        let id = r.raw["external_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        out.push((now, ids.contains(&id)));
    }
    out
}

#[tokio::test]
async fn the_pool_holds_no_more_connections_than_it_is_given() {
    let db = TestDb::create().await;
    let w = PostgresWarehouse::connect_with_pool(&db.url, 2)
        .await
        .expect("connect");
    let a = w.pool().acquire().await.expect("first");
    let b = w.pool().acquire().await.expect("second");
    let third =
        tokio::time::timeout(std::time::Duration::from_millis(500), w.pool().acquire()).await;
    assert!(third.is_err(), "a third connection was handed out");
    drop(a);
    let third = tokio::time::timeout(std::time::Duration::from_secs(5), w.pool().acquire()).await;
    assert!(third.is_ok(), "a returned connection is handed out again");
    drop(b);
    assert!(w.pool().size() <= 2);
}
