//! PostgreSQL and MariaDB as sources, against real servers: the type matrix, keyset paging
//! through 10,000 rows sharing one `updated_at`, incremental runs, a connection killed
//! mid-stream, and hostile table names.

mod support;

use sluice_engine::prelude::*;
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use rust_decimal::Decimal;
use sluice_connectors::sql::{SqlKind, SqlSource, SqlSourceConfig, SqlTarget};
use sluice_connectors::{ReadRequest, Source};
use sluice_engine::{RowCounts, SqliteWarehouse, TenantSlug};
use sluice_pipelines::map::cell_text;
use sluice_pipelines::{
    PipelineSource, PipelineSpec, Quiet, RunObserver, RunOptions, run_pipeline,
};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use support::mysql::TestMysql;
use support::pg::TestDb;

async fn read_all(source: &SqlSource) -> (Vec<String>, Vec<Vec<Option<String>>>) {
    let streams = source.streams().await.expect("discover");
    let names = streams[0]
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut stream = source
        .read(ReadRequest {
            stream: streams[0].name.clone(),
            from: None,
            batch_rows: 2,
        })
        .await
        .expect("read");
    let mut rows = Vec::new();
    while let Some(batch) = stream.next().await {
        let b = batch.expect("batch").records;
        for r in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .map(|c| cell_text(c.as_ref(), r))
                    .collect(),
            );
        }
    }
    (names, rows)
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

#[tokio::test]
async fn postgres_type_matrix_reads_every_value_exactly() {
    let db = TestDb::create().await;
    let mut conn = db.connect().await;
    sqlx::raw_sql(
        "CREATE TABLE matrix (id bigint PRIMARY KEY, i2 smallint, i4 integer, n numeric(12,3), nf numeric, t text, v varchar(20), c char(3), \
           d date, ts timestamp, tstz timestamptz, b boolean, j jsonb, u uuid); \
         INSERT INTO matrix VALUES \
           (1, -7, 2147483647, 12345.678, 0.1234567890123, 'héllo', 'x\"y', 'ab', '2024-02-29', '2024-03-01 12:30:45.123456', '2024-03-01 12:00:00+02', true, '{\"a\": [1, 2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'), \
           (2, NULL, NULL, -0.001, NULL, '', NULL, NULL, NULL, NULL, NULL, false, NULL, NULL)",
    )
    .execute(&mut conn)
    .await
    .expect("setup");
    let source = SqlSource::new(SqlSourceConfig {
        kind: SqlKind::Postgres,
        url: db.url.clone(),
        password: None,
        target: SqlTarget::table("public.matrix").expect("name"),
        cursor: vec!["id".into()],
        tls: None,
        egress: sluice_connectors::egress::EgressPolicy::unrestricted(),
        timeouts: Default::default(),
    })
    .expect("source");
    let (names, rows) = read_all(&source).await;
    assert_eq!(
        names,
        [
            "id", "i2", "i4", "n", "nf", "t", "v", "c", "d", "ts", "tstz", "b", "j", "u"
        ]
    );
    assert_eq!(
        rows[0],
        vec![
            s("1"),
            s("-7"),
            s("2147483647"),
            s("12345.678"),
            s("0.1234567890123"),
            s("héllo"),
            s("x\"y"),
            s("ab "),
            s("2024-02-29"),
            s("2024-03-01T12:30:45.123456Z"),
            s("2024-03-01T10:00:00.000000Z"),
            s("true"),
            s("{\"a\":[1,2]}"),
            s("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        ]
    );
    assert_eq!(
        rows[1],
        vec![
            s("2"),
            None,
            None,
            s("-0.001"),
            None,
            s(""),
            None,
            None,
            None,
            None,
            None,
            s("false"),
            None,
            None
        ]
    );
    assert_eq!(
        full_refresh_rows(SqlKind::Postgres, &db.url, "public.matrix").await,
        rows,
        "a full refresh reads the same values"
    );

    sqlx::raw_sql("CREATE TABLE odd (id int PRIMARY KEY, p point)")
        .execute(&mut conn)
        .await
        .expect("odd");
    let odd = SqlSource::new(SqlSourceConfig {
        kind: SqlKind::Postgres,
        url: db.url.clone(),
        password: None,
        target: SqlTarget::table("odd").expect("name"),
        cursor: vec![],
        tls: None,
        egress: sluice_connectors::egress::EgressPolicy::unrestricted(),
        timeouts: Default::default(),
    })
    .expect("source");
    let err = odd.streams().await.expect_err("point is not read");
    assert!(
        err.to_string().contains("\"p\"") && err.to_string().contains("point"),
        "{err}"
    );
}

#[tokio::test]
async fn mariadb_type_matrix_reads_every_value_exactly() {
    let db = TestMysql::create().await;
    let mut conn = db.connect().await;
    sqlx::raw_sql(
        "CREATE TABLE matrix (id bigint PRIMARY KEY, ti tinyint, i int, big bigint unsigned, n decimal(12,3), t text, v varchar(20), \
           d date, dt datetime(6), ts timestamp(6) NULL, b boolean, j json); \
         SET time_zone = '+00:00'; \
         INSERT INTO matrix VALUES \
           (1, -7, 2147483647, 18446744073709551615, 12345.678, 'héllo', 'x`y', '2024-02-29', '2024-03-01 12:30:45.123456', '2024-03-01 10:00:00', true, '{\"a\": [1, 2]}'), \
           (2, NULL, NULL, 5, -0.001, '', NULL, NULL, NULL, NULL, false, NULL)",
    )
    .execute(&mut conn)
    .await
    .expect("setup");
    let source = SqlSource::new(SqlSourceConfig {
        kind: SqlKind::Mysql,
        url: db.url.clone(),
        password: None,
        target: SqlTarget::table("matrix").expect("name"),
        cursor: vec!["id".into()],
        tls: None,
        egress: sluice_connectors::egress::EgressPolicy::unrestricted(),
        timeouts: Default::default(),
    })
    .expect("source");
    let (names, rows) = read_all(&source).await;
    assert_eq!(
        names,
        [
            "id", "ti", "i", "big", "n", "t", "v", "d", "dt", "ts", "b", "j"
        ]
    );
    assert_eq!(
        rows[0],
        vec![
            s("1"),
            s("-7"),
            s("2147483647"),
            s("18446744073709551615"),
            s("12345.678"),
            s("héllo"),
            s("x`y"),
            s("2024-02-29"),
            s("2024-03-01T12:30:45.123456Z"),
            s("2024-03-01T10:00:00.000000Z"),
            s("true"),
            s("{\"a\": [1, 2]}")
        ]
    );
    assert_eq!(
        rows[1],
        vec![
            s("2"),
            None,
            None,
            s("5"),
            s("-0.001"),
            s(""),
            None,
            None,
            None,
            None,
            s("false"),
            None
        ]
    );
    assert_eq!(
        full_refresh_rows(SqlKind::Mysql, &db.url, "matrix").await,
        rows,
        "a full refresh reads the same values"
    );
}

/// Every row of `table` read without a cursor (one snapshot, streamed), sorted by its first
/// column.
async fn full_refresh_rows(kind: SqlKind, url: &str, table: &str) -> Vec<Vec<Option<String>>> {
    let source = SqlSource::new(SqlSourceConfig {
        kind,
        url: url.to_string(),
        password: None,
        target: SqlTarget::table(table).expect("name"),
        cursor: vec![],
        tls: None,
        egress: sluice_connectors::egress::EgressPolicy::unrestricted(),
        timeouts: Default::default(),
    })
    .expect("source");
    let (_, mut rows) = read_all(&source).await;
    rows.sort_by_key(|r| r[0].as_deref().and_then(|v| v.parse::<i64>().ok()));
    rows
}

fn invoice_rows(n: usize, same_updated_at: bool) -> Vec<String> {
    (1..=n)
        .map(|i| {
            let ts = if same_updated_at {
                "2024-05-01 10:00:00".to_string()
            } else {
                format!("2024-05-01 10:00:{:02}", i % 60)
            };
            format!(
                "({i}, 'INV-{i:06}', '2024-04-01', '2024-05-01', 'USD', {}.25, {}.25, '{ts}')",
                100 + i,
                i % 7
            )
        })
        .collect()
}

const SOURCE_TABLE: &str = "(id bigint PRIMARY KEY, external_id varchar(40) NOT NULL, issue_date date NOT NULL, due_date date NOT NULL, \
    currency char(3) NOT NULL, total decimal(12,2) NOT NULL, balance decimal(12,2) NOT NULL, updated_at timestamp(6) NOT NULL)";

fn spec(dir: &Path, kind: &str, url: &str, cursor: &str, batch_rows: usize) -> PipelineSpec {
    let text = format!(
        "name = \"erp-invoices\"\ntenant = \"acme\"\nentity = \"invoices\"\nbatch_rows = {batch_rows}\n\
         [source]\nkind = \"{kind}\"\nurl = \"{url}\"\ntable = \"src_invoices\"\ncursor = {cursor}\n"
    );
    let path = dir.join("p.toml");
    std::fs::write(&path, text).expect("toml");
    PipelineSpec::from_file(&path).expect("spec")
}

async fn loaded(w: &SqliteWarehouse) -> (usize, Decimal, usize) {
    let inv = w
        .invoices(&TenantSlug::parse("acme").expect("slug"))
        .await
        .expect("invoices");
    let distinct: HashSet<&str> = inv.iter().map(|i| i.external_id.as_str()).collect();
    (inv.len(), inv.iter().map(|i| i.total).sum(), distinct.len())
}

fn expected_sum(n: usize) -> Decimal {
    (1..=n)
        .map(|i| Decimal::new((100 + i as i64) * 100 + 25, 2))
        .sum()
}

async fn setup_pg(db: &TestDb, rows: &[String]) {
    let mut conn = db.connect().await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE src_invoices {}",
        SOURCE_TABLE.replace("timestamp(6)", "timestamp")
    )))
    .execute(&mut conn)
    .await
    .expect("table");
    for chunk in rows.chunks(1000) {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "INSERT INTO src_invoices VALUES {}",
            chunk.join(", ")
        )))
        .execute(&mut conn)
        .await
        .expect("rows");
    }
}

async fn setup_mysql(db: &TestMysql, rows: &[String]) {
    let mut conn = db.connect().await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET time_zone = '+00:00'; CREATE TABLE src_invoices {SOURCE_TABLE}"
    )))
    .execute(&mut conn)
    .await
    .expect("table");
    for chunk in rows.chunks(1000) {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SET time_zone = '+00:00'; INSERT INTO src_invoices VALUES {}",
            chunk.join(", ")
        )))
        .execute(&mut conn)
        .await
        .expect("rows");
    }
}

async fn ten_thousand_sharing_one_updated_at(kind: &str, url: &str, cursor: &str) {
    let dir = tempfile::tempdir().expect("tmp");
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let spec = spec(dir.path(), kind, url, cursor, 1000);
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    let report = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("run");
    assert_eq!(
        report.ledger.counts.rows_read, 10_000,
        "{kind} {cursor}: no row read twice"
    );
    assert_eq!(report.ledger.counts.inserted, 10_000);
    assert_eq!(report.ledger.counts.deduplicated, 0);
    assert_eq!(
        loaded(&w).await,
        (10_000, expected_sum(10_000), 10_000),
        "{kind} {cursor}"
    );
    let again = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("incremental run");
    assert_eq!(
        again.ledger.counts.rows_read, 0,
        "nothing new after the cursor"
    );
}

#[tokio::test]
async fn ten_thousand_rows_sharing_one_updated_at_load_exactly_once() {
    let rows = invoice_rows(10_000, true);
    let pg = TestDb::create().await;
    setup_pg(&pg, &rows).await;
    let my = TestMysql::create().await;
    setup_mysql(&my, &rows).await;
    for cursor in ["[\"updated_at\", \"id\"]", "[\"updated_at\"]"] {
        ten_thousand_sharing_one_updated_at("postgres", &pg.url, cursor).await;
        ten_thousand_sharing_one_updated_at("mysql", &my.url, cursor).await;
    }
}

#[tokio::test]
async fn rows_inserted_and_updated_between_runs_are_picked_up_once() {
    let pg = TestDb::create().await;
    setup_pg(&pg, &invoice_rows(3_000, false)).await;
    let my = TestMysql::create().await;
    setup_mysql(&my, &invoice_rows(3_000, false)).await;
    for (kind, url) in [("postgres", pg.url.clone()), ("mysql", my.url.clone())] {
        let dir = tempfile::tempdir().expect("tmp");
        let w = SqliteWarehouse::new(dir.path().join("data"));
        let spec = spec(dir.path(), kind, &url, "[\"updated_at\", \"id\"]", 700);
        let source = PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source");
        run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
            .await
            .expect("first run");
        let changes = [
            "INSERT INTO src_invoices VALUES (5001, 'INV-005001', '2024-06-01', '2024-07-01', 'EUR', 10.00, 10.00, '2024-06-01 00:00:00'), \
             (5002, 'INV-005002', '2024-06-01', '2024-07-01', 'EUR', 20.00, 20.00, '2024-06-01 00:00:00')",
            "UPDATE src_invoices SET balance = 0, updated_at = '2024-06-02 00:00:00' WHERE id IN (1, 2, 3)",
        ];
        for sql in changes {
            if kind == "postgres" {
                let mut c = PgConnection::connect(&url).await.expect("pg");
                sqlx::raw_sql(sql).execute(&mut c).await.expect("change");
            } else {
                let mut c = sqlx::MySqlConnection::connect(&url).await.expect("mysql");
                sqlx::raw_sql(AssertSqlSafe(format!("SET time_zone = '+00:00'; {sql}")))
                    .execute(&mut c)
                    .await
                    .expect("change");
            }
        }
        let second = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
            .await
            .expect("second run");
        let c = second.ledger.counts;
        assert_eq!(
            (c.rows_read, c.inserted, c.updated, c.unchanged),
            (5, 2, 3, 0),
            "{kind}"
        );
        let third = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
            .await
            .expect("third run");
        assert_eq!(third.ledger.counts.rows_read, 0, "{kind}: nothing repeated");
        let (n, _, distinct) = loaded(&w).await;
        assert_eq!((n, distinct), (3_002, 3_002), "{kind}");
        let paid = w
            .invoices(&TenantSlug::parse("acme").expect("slug"))
            .await
            .expect("inv");
        assert!(
            paid.iter()
                .filter(|i| ["INV-000001", "INV-000002", "INV-000003"]
                    .contains(&i.external_id.as_str()))
                .all(|i| i.status == "paid")
        );
    }
}

/// Holds the run after its first committed batch until the test has killed the source's
/// connection.
struct KillAfterFirstBatch {
    done: Mutex<bool>,
    kill: Arc<dyn Fn() + Send + Sync>,
}

impl RunObserver for KillAfterFirstBatch {
    fn batch_committed(&self, _totals: &RowCounts) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if !*done {
            *done = true;
            (self.kill)();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_connection_killed_mid_stream_is_retryable_and_the_rerun_resumes() {
    let pg = TestDb::create().await;
    setup_pg(&pg, &invoice_rows(20_000, false)).await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let spec = spec(
        dir.path(),
        "postgres",
        &pg.url,
        "[\"updated_at\", \"id\"]",
        500,
    );
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    let url = pg.url.clone();
    let observer = KillAfterFirstBatch {
        done: Mutex::new(false),
        kill: Arc::new(move || {
            let url = url.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
                rt.block_on(async {
                    let mut c = PgConnection::connect(&url).await.expect("admin");
                    let killed: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid()) k",
                    )
                    .fetch_one(&mut c)
                    .await
                    .expect("terminate");
                    assert!(killed >= 1, "the source connection was open");
                });
            })
            .join()
            .expect("killer");
        }),
    };
    let err = run_pipeline(&spec, &source, &w, &RunOptions::default(), &observer)
        .await
        .expect_err("connection killed");
    assert!(err.is_transient(), "{err}");
    let tenant = TenantSlug::parse("acme").expect("slug");
    let failed = w
        .run(&tenant, err.run_id().expect("id"))
        .await
        .expect("ledger")
        .expect("run");
    assert!(
        failed.counts.rows_read >= 500 && failed.counts.rows_read < 20_000,
        "{:?}",
        failed.counts
    );

    let rerun = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("rerun");
    assert_eq!(
        failed.counts.rows_read + rerun.ledger.counts.rows_read,
        20_000,
        "resumed exactly after the last commit"
    );
    assert_eq!(loaded(&w).await, (20_000, expected_sum(20_000), 20_000));
}

#[tokio::test]
async fn hostile_table_names_are_rejected_before_any_query() {
    // Port 1 is closed: had anything tried to connect, the error would say so.
    for table in [
        "inv\"; DROP TABLE x; --",
        "inv; select 1",
        "inv /* c */",
        "inv--x",
        "a.b.c",
    ] {
        let text = format!(
            "name = \"p\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"postgres\"\nurl = \"postgres://u:pw@127.0.0.1:1/x\"\ntable = {}\n",
            toml_string(table)
        );
        let err = PipelineSpec::from_toml(&text).expect_err(table);
        assert!(
            err.message().contains("not a plain identifier") || err.message().contains("must be"),
            "{table}: {err}"
        );
        assert!(!err.message().contains("connect"), "{err}");
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[tokio::test]
async fn soft_deleted_rows_are_marked_and_leave_the_figures() {
    let pg = TestDb::create().await;
    let my = TestMysql::create().await;
    let mut c = pg.connect().await;
    sqlx::raw_sql(
        "CREATE TABLE src_invoices (id bigint PRIMARY KEY, external_id text NOT NULL, issue_date date, due_date date, currency text, \
           total numeric(12,2), balance numeric(12,2), updated_at timestamp NOT NULL, deleted_at timestamptz); \
         INSERT INTO src_invoices VALUES (1, 'A', '2024-01-01', '2024-01-31', 'USD', 10, 10, '2024-02-01', NULL), \
           (2, 'B', '2024-01-01', '2024-01-31', 'USD', 20, 20, '2024-02-01', NULL), (3, 'C', '2024-01-01', '2024-01-31', 'USD', 30, 30, '2024-02-01', NULL)",
    )
    .execute(&mut c)
    .await
    .expect("pg setup");
    let mut m = my.connect().await;
    sqlx::raw_sql(
        "CREATE TABLE src_invoices (id bigint PRIMARY KEY, external_id varchar(10) NOT NULL, issue_date date, due_date date, currency char(3), \
           total decimal(12,2), balance decimal(12,2), updated_at datetime(6) NOT NULL, is_deleted boolean NOT NULL DEFAULT false); \
         INSERT INTO src_invoices VALUES (1, 'A', '2024-01-01', '2024-01-31', 'USD', 10, 10, '2024-02-01', false), \
           (2, 'B', '2024-01-01', '2024-01-31', 'USD', 20, 20, '2024-02-01', false), (3, 'C', '2024-01-01', '2024-01-31', 'USD', 30, 30, '2024-02-01', false)",
    )
    .execute(&mut m)
    .await
    .expect("mysql setup");

    for (kind, url, column) in [
        ("postgres", pg.url.clone(), "deleted_at"),
        ("mysql", my.url.clone(), "is_deleted"),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let text = format!(
            "name = \"erp\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"{kind}\"\nurl = \"{url}\"\ntable = \"src_invoices\"\n\
             cursor = [\"updated_at\", \"id\"]\nsoft_delete = \"{column}\"\n"
        );
        let spec = PipelineSpec::from_toml(&text).expect("spec");
        let w = SqliteWarehouse::new(dir.path().join("data"));
        let source = PipelineSource::from_spec(
            &spec.source,
            None,
            &sluice_pipelines::SourceReach::unrestricted(),
        )
        .expect("source");
        run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
            .await
            .expect("first");
        let delete = if kind == "postgres" {
            "UPDATE src_invoices SET deleted_at = '2024-03-01T00:00:00Z', updated_at = '2024-03-01' WHERE id = 2"
        } else {
            "UPDATE src_invoices SET is_deleted = true, updated_at = '2024-03-01' WHERE id = 2"
        };
        if kind == "postgres" {
            sqlx::raw_sql(delete).execute(&mut c).await.expect("delete");
        } else {
            sqlx::raw_sql(delete).execute(&mut m).await.expect("delete");
        }
        let second = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
            .await
            .expect("second");
        assert_eq!(
            (second.ledger.counts.rows_read, second.ledger.counts.updated),
            (1, 1),
            "{kind}"
        );
        let tenant = TenantSlug::parse("acme").expect("slug");
        let ids: Vec<String> = w
            .invoices(&tenant)
            .await
            .expect("inv")
            .into_iter()
            .map(|i| i.external_id)
            .collect();
        assert_eq!(
            ids,
            ["A", "C"],
            "{kind}: the deleted invoice is no longer listed"
        );
        let aging = w
            .aging(
                &tenant,
                sluice_engine::finance_rules::AgingSide::Receivable,
                "2024-06-30".parse().expect("d"),
            )
            .await
            .expect("aging");
        assert_eq!(
            aging.currencies["USD"].over_90,
            Decimal::new(4000, 2),
            "{kind}: 10 + 30, not 60"
        );
    }
}

#[tokio::test]
async fn the_cli_checks_a_source_and_lists_its_catalog() {
    let pg = TestDb::create().await;
    let mut c = pg.connect().await;
    sqlx::raw_sql("CREATE TABLE src_invoices (id bigint PRIMARY KEY, total numeric(12,2), geo point, updated_at timestamptz NOT NULL)")
        .execute(&mut c)
        .await
        .expect("setup");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"erp\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"postgres\"\nurl = \"{}\"\ntable = \"src_invoices\"\n",
            pg.url
        ),
    )
    .expect("toml");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .output()
            .expect("run")
    };
    let check = run(&["source", "check", path.to_str().expect("path")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("SELECT on \"src_invoices\" granted") && out.contains(" ms)"),
        "{out}"
    );

    let discover = run(&["source", "discover", path.to_str().expect("path"), "--json"]);
    assert!(
        discover.status.success(),
        "{}",
        String::from_utf8_lossy(&discover.stderr)
    );
    let listing: serde_json::Value = serde_json::from_slice(&discover.stdout).expect("json");
    let table = listing
        .as_array()
        .and_then(|a| a.iter().find(|t| t["stream"] == "public.src_invoices"))
        .expect("table listed");
    let cols = table["columns"].as_array().expect("columns");
    assert_eq!(cols[1]["reads_as"], "Decimal128(38, 2)");
    assert!(
        cols[2]["unsupported"]
            .as_str()
            .unwrap_or("")
            .contains("point"),
        "{cols:?}"
    );
    assert_eq!(cols[3]["nullable"], false);
}

#[tokio::test]
async fn a_full_refresh_reads_everything_each_run_and_finds_it_unchanged() {
    let pg = TestDb::create().await;
    setup_pg(&pg, &invoice_rows(2_500, false)).await;
    let dir = tempfile::tempdir().expect("tmp");
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let text = format!(
        "name = \"erp-invoices\"\ntenant = \"acme\"\nentity = \"invoices\"\nbatch_rows = 1000\n[source]\nkind = \"postgres\"\nurl = \"{}\"\ntable = \"src_invoices\"\n",
        pg.url
    );
    let spec = PipelineSpec::from_toml(&text).expect("spec");
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    let first = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("first");
    assert_eq!(
        (first.ledger.counts.rows_read, first.ledger.counts.inserted),
        (2_500, 2_500)
    );
    let second = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("second");
    assert_eq!(
        (
            second.ledger.counts.rows_read,
            second.ledger.counts.unchanged
        ),
        (2_500, 2_500)
    );
    assert_eq!(loaded(&w).await, (2_500, expected_sum(2_500), 2_500));
}

fn sleeping_pipeline(url: &str, extra: &str) -> PipelineSpec {
    PipelineSpec::from_toml(&format!(
        "name = \"slow\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"postgres\"\nurl = \"{url}\"\n\
         query = \"SELECT 'INV-1'::text AS external_id, 'C-1'::text AS customer_id, 'Acme'::text AS customer_name, \
         date '2024-01-01' AS issue_date, date '2024-02-01' AS due_date, 'EUR'::text AS currency, 10.00::numeric(12,2) AS total, \
         10.00::numeric(12,2) AS balance, s::text AS note FROM pg_sleep(1e9) s\"\n{extra}"
    ))
    .expect("spec")
}

#[tokio::test]
async fn a_query_that_never_answers_is_stopped_by_the_statement_timeout() {
    let db = TestDb::create().await;
    let spec = sleeping_pipeline(&db.url, "statement_timeout_secs = 1\n");
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let w = SqliteWarehouse::new(dir.path());
    let started = std::time::Instant::now();
    let err = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect_err("the statement is cancelled");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("statement timeout"), "{err}");
}

#[tokio::test]
async fn a_job_attempt_past_the_job_timeout_fails_as_transient_and_is_retried_then_dead() {
    use sluice_workers::jobs::{JobOutcome, SyncJob, continue_sync_job};
    use sluice_workers::retry::RetryPolicy;
    let db = TestDb::create().await;
    let spec = sleeping_pipeline(&db.url, "");
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let w = SqliteWarehouse::new(dir.path());
    let job = SyncJob {
        tenant: "acme".into(),
        pipeline: "slow".into(),
        trigger: sluice_engine::RunTrigger::Api,
        run_id: "run-slow".into(),
        correlation_id: "c".into(),
        lock_token: None,
        file: None,
    };
    let policy = RetryPolicy {
        attempts: 2,
        attempt_timeout: std::time::Duration::from_secs(2),
        jitter: false,
        ..RetryPolicy::with_base(std::time::Duration::from_millis(10))
    };
    let started = std::time::Instant::now();
    let outcome = continue_sync_job(&job, Vec::new(), &spec, &source, &w, &policy, &Quiet)
        .await
        .expect("job");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let JobOutcome::Dead { failed, reason, .. } = outcome else {
        panic!("the job should be dead");
    };
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed.iter().all(|a| a.transient), "{failed:?}");
    assert!(reason.contains("job timeout"), "{reason}");
    // Each attempt's ledger is closed as failed with the reason, not left running.
    let tenant = TenantSlug::parse("acme").expect("slug");
    for n in 1..=2 {
        if let Some(run) = w.run(&tenant, &job.attempt_run_id(n)).await.expect("run") {
            assert_eq!(run.status, sluice_engine::RunStatus::Failed, "{run:?}");
        }
    }
}

/// `pipeline init --url --table`: the mapping and an incremental cursor proposed from a
/// PostgreSQL and a MariaDB table's columns, a password kept out of the file, and a dry
/// run that reads the table and writes nothing.
#[tokio::test]
async fn pipeline_init_proposes_a_table_pipeline_on_both_databases() {
    use support::mysql::TestMysql;
    use support::pg::TestDb;
    let pg = TestDb::create().await;
    let my = TestMysql::create().await;
    let ddl = "CREATE TABLE erp_invoices (id bigint PRIMARY KEY, invoice_no varchar(20) NOT NULL, \
        customer varchar(40), invoice_date date NOT NULL, due_date date NOT NULL, currency char(3) NOT NULL, \
        total decimal(12,2) NOT NULL, amount_due decimal(12,2) NOT NULL, last_modified timestamp NOT NULL)";
    let rows = "INSERT INTO erp_invoices VALUES \
        (1, 'A-1', 'Acme', '2024-01-05', '2024-02-04', 'USD', 100.00, 100.00, '2024-01-05 10:00:00'), \
        (2, 'A-2', 'Acme', '2024-01-06', '2024-02-05', 'EUR', 50.00, 0.00, '2024-01-06 10:00:00'), \
        (3, 'A-3', 'Beta', '2024-01-07', '2024-02-06', 'USD', 10.00, 20.00, '2024-01-07 10:00:00')";
    {
        let mut c = pg.connect().await;
        sqlx::raw_sql(ddl).execute(&mut c).await.expect("pg table");
        sqlx::raw_sql(rows).execute(&mut c).await.expect("pg rows");
        let mut c = my.connect().await;
        sqlx::raw_sql(ddl).execute(&mut c).await.expect("my table");
        sqlx::raw_sql(rows).execute(&mut c).await.expect("my rows");
    }
    let dir = tempfile::tempdir().expect("tmp");
    for (kind, url) in [("postgres", pg.url.clone()), ("mysql", my.url.clone())] {
        let out_file = dir.path().join(format!("{kind}.toml"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("SLUICE_DATABASE_URL")
            .env_remove("SLUICE_REDIS_URL")
            .args([
                "pipeline",
                "init",
                "--url",
                &url,
                "--table",
                "erp_invoices",
                "--entity",
                "invoices",
            ])
            .arg("--output")
            .arg(&out_file)
            .output()
            .expect("sluice");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{kind}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let toml = std::fs::read_to_string(&out_file).expect("pipeline file");
        for line in [
            format!("kind = \"{kind}\""),
            "table = \"erp_invoices\"".to_string(),
            "cursor = [\"last_modified\", \"id\"]".to_string(),
            "doc_number = \"invoice_no\"".to_string(),
            "customer_name = \"customer\"".to_string(),
            "issue_date = \"invoice_date\"".to_string(),
            "balance = \"amount_due\"".to_string(),
        ] {
            assert!(toml.contains(&line), "{kind}: {line} not in\n{toml}");
        }
        assert!(
            !toml.contains("date_formats"),
            "typed columns need no format: {toml}"
        );
        assert!(stdout.contains("would load        2"), "{kind}: {stdout}");
        assert!(stdout.contains("would quarantine  1"), "{kind}: {stdout}");
    }
    assert!(!dir.path().join("data").join("tenants").exists());
}
