//! The chaos soak: PostgreSQL, a private Redis (append-only), `sluice serve`, three workers
//! and two schedulers run 30 pipelines of mixed sources (CSV, XLSX, PostgreSQL, MariaDB,
//! the QuickBooks and Odoo fakes) on cron every few seconds while their sources change.
//! Every few seconds a random worker or scheduler is killed with `kill -9` (and started
//! again), now and then Redis is restarted and the warehouse connection is paused through a
//! proxy, and API clients trigger syncs and read lists. It stops by itself; then every
//! warehouse table must equal its source, each cron tick must have run once (in a run that
//! started after it), no lock may be held, no job stuck, and the only dead letters are the
//! ones it planted (a QuickBooks connection whose refresh token was revoked).
//!
//! `scripts/chaos [seconds]` runs it and prints what it did; `scripts/test` runs it for two
//! minutes. `SLUICE_CHAOS_SECS` (default 120) and `SLUICE_CHAOS_SEED` choose the length and
//! the dice.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

use sluice_engine::control::DeadLetterStore;
use sluice_engine::warehouse::FinanceStore;
use sluice_engine::warehouse::{PostgresWarehouse, RunHistory};
use sluice_engine::{JobLedger, RunStatus, RunTrigger};
use sluice_pipelines::PipelineSpec;
use sluice_workers::{JobStatus, QueueName, Queues, TriggerRequest};
use support::Rng;
use support::jobs::*;
use support::mysql::TestMysql;
use support::odoo::{self, FakeOdoo};
use support::pg::{MASTER_KEY_HEX, TestDb};
use support::proxy::StallProxy;
use support::qbo::{self, FakeQbo};
use support::redis::PrivateRedis;

const PREFIX: &str = "sluice";
const CURRENCIES: [&str; 3] = ["USD", "EUR", "GBP"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Csv,
    Xlsx,
    Postgres,
    Mysql,
    QuickBooks,
    Odoo,
}

/// How many pipelines of each kind (29, and the planted one makes 30).
const MIX: [(Kind, usize); 6] = [
    (Kind::Csv, 6),
    (Kind::Xlsx, 4),
    (Kind::Postgres, 6),
    (Kind::Mysql, 6),
    (Kind::QuickBooks, 4),
    (Kind::Odoo, 3),
];

/// One invoice as its source holds it.
#[derive(Clone, Debug, PartialEq)]
struct Doc {
    currency: &'static str,
    cents: i64,
    version: u64,
}

/// A pipeline of the soak, its tenant of its own, and what its source holds now.
struct Soaked {
    name: String,
    tenant: String,
    kind: Kind,
    docs: BTreeMap<u64, Doc>,
    next_id: u64,
    /// Planted to fail for good: its dead letters are expected.
    planted: bool,
}

impl Soaked {
    /// The external id the warehouse keeps for document `id`.
    fn external_id(&self, id: u64) -> String {
        match self.kind {
            Kind::QuickBooks | Kind::Odoo => id.to_string(),
            _ => format!("INV-{id:06}"),
        }
    }

    /// external id -> (currency, total) as the source holds them.
    fn expected(&self) -> BTreeMap<String, (String, Decimal)> {
        self.docs
            .iter()
            .map(|(id, d)| {
                (
                    self.external_id(*id),
                    (d.currency.to_string(), Decimal::new(d.cents, 2)),
                )
            })
            .collect()
    }
}

fn issue_date(id: u64) -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2024, 1, 1).expect("date")
        + chrono::Duration::days((id * 37 % 700) as i64)
}

fn due_date(id: u64) -> chrono::NaiveDate {
    issue_date(id) + chrono::Duration::days(30)
}

fn money(cents: i64) -> String {
    Decimal::new(cents, 2).to_string()
}

fn new_doc(rng: &mut Rng) -> Doc {
    Doc {
        currency: CURRENCIES[rng.below(3) as usize],
        cents: 1_000 + rng.below(2_000_000) as i64,
        version: 0,
    }
}

/// The services the sources live in.
struct Sources {
    dir: PathBuf,
    pg: TestDb,
    my: TestMysql,
    qbo: HashMap<String, FakeQbo>,
    odoo: HashMap<String, FakeOdoo>,
}

impl Sources {
    fn file(&self, p: &Soaked) -> PathBuf {
        let ext = if p.kind == Kind::Xlsx { "xlsx" } else { "csv" };
        self.dir.join(format!("{}.{ext}", p.name))
    }

    /// Creates the source of `p` with its documents and writes its pipeline file.
    async fn create(&mut self, p: &Soaked, batch_rows: usize, cron: &str) -> PipelineSpec {
        let source = match p.kind {
            Kind::Csv | Kind::Xlsx => {
                self.write_file(p);
                format!(
                    "kind = \"{}\"\npath = \"{}\"\n",
                    if p.kind == Kind::Csv { "csv" } else { "xlsx" },
                    self.file(p).display()
                )
            }
            Kind::Postgres | Kind::Mysql => {
                self.run_sql(p.kind, format!("CREATE TABLE src_{} {SQL_TABLE}", p.name))
                    .await;
                self.upsert_sql(p, p.docs.keys().copied().collect()).await;
                let (kind, url) = if p.kind == Kind::Postgres {
                    ("postgres", &self.pg.url)
                } else {
                    ("mysql", &self.my.url)
                };
                format!(
                    "kind = \"{kind}\"\nurl = \"{url}\"\ntable = \"src_{}\"\ncursor = [\"updated_at\", \"id\"]\n",
                    p.name
                )
            }
            Kind::QuickBooks => {
                let fake = FakeQbo::start(qbo::Books::default()).await;
                let refresh = if p.planted {
                    "rt-revoked"
                } else {
                    qbo::FIRST_REFRESH
                };
                let source = format!(
                    "kind = \"quickbooks\"\nrealm_id = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{refresh}\"\nstream = \"Invoice\"\nbase_url = \"{}\"\ntoken_url = \"{}\"\npage_size = 100\n",
                    qbo::REALM,
                    qbo::CLIENT_ID,
                    qbo::CLIENT_SECRET,
                    fake.url,
                    fake.token_url()
                );
                self.qbo.insert(p.name.clone(), fake);
                self.change_saas(p, p.docs.keys().copied().collect());
                source
            }
            Kind::Odoo => {
                let fake = FakeOdoo::start(odoo::Database::default()).await;
                let source = format!(
                    "kind = \"odoo\"\nurl = \"{}\"\ndb = \"{}\"\nlogin = \"{}\"\napi_key = \"{}\"\nstream = \"invoices\"\npage_size = 100\n",
                    fake.url,
                    odoo::DB,
                    odoo::LOGIN,
                    odoo::API_KEY
                );
                self.odoo.insert(p.name.clone(), fake);
                self.change_saas(p, p.docs.keys().copied().collect());
                source
            }
        };
        let path = self.dir.join(format!("{}.toml", p.name));
        std::fs::write(
            &path,
            format!(
                "name = \"{}\"\ntenant = \"{}\"\nentity = \"invoices\"\nbatch_rows = {batch_rows}\n[source]\n{source}[schedule]\ncron = \"{cron}\"\n",
                p.name, p.tenant
            ),
        )
        .expect("pipeline file");
        PipelineSpec::from_file(&path).expect("spec")
    }

    /// Writes the file of a CSV or XLSX pipeline whole, then renames it into place (as a
    /// tool that saves a spreadsheet does), so a reader sees the old file or the new one.
    fn write_file(&self, p: &Soaked) {
        let path = self.file(p);
        let tmp = path.with_extension("tmp");
        if p.kind == Kind::Csv {
            let mut out = String::from("external_id,issue_date,due_date,currency,total,balance\n");
            for (id, d) in &p.docs {
                out.push_str(&format!(
                    "{},{},{},{},{},{}\n",
                    p.external_id(*id),
                    issue_date(*id),
                    due_date(*id),
                    d.currency,
                    money(d.cents),
                    money(d.cents)
                ));
            }
            std::fs::write(&tmp, out).expect("csv");
        } else {
            use rust_xlsxwriter::{Format, Workbook};
            let mut book = Workbook::new();
            let sheet = book.add_worksheet();
            let dates = Format::new().set_num_format("yyyy-mm-dd");
            for (c, h) in [
                "external_id",
                "issue_date",
                "due_date",
                "currency",
                "total",
                "balance",
            ]
            .iter()
            .enumerate()
            {
                sheet.write_string(0, c as u16, *h).expect("header");
            }
            for (r, (id, d)) in p.docs.iter().enumerate() {
                let r = r as u32 + 1;
                let amount: f64 = Decimal::new(d.cents, 2).to_string().parse().expect("f64");
                sheet.write_string(r, 0, p.external_id(*id)).expect("cell");
                sheet
                    .write_date_with_format(r, 1, xlsx_date(issue_date(*id)), &dates)
                    .expect("cell");
                sheet
                    .write_date_with_format(r, 2, xlsx_date(due_date(*id)), &dates)
                    .expect("cell");
                sheet.write_string(r, 3, d.currency).expect("cell");
                sheet.write_number(r, 4, amount).expect("cell");
                sheet.write_number(r, 5, amount).expect("cell");
            }
            book.save(&tmp).expect("xlsx");
        }
        std::fs::rename(&tmp, &path).expect("rename");
    }

    /// Writes documents `ids` of a SQL pipeline (new or changed), 500 to a statement, each
    /// stamped `updated_at` now.
    async fn upsert_sql(&self, p: &Soaked, ids: Vec<u64>) {
        let now = chrono::Utc::now()
            .naive_utc()
            .format("%Y-%m-%d %H:%M:%S%.6f")
            .to_string();
        let rows: Vec<String> = ids
            .iter()
            .map(|id| {
                let d = &p.docs[id];
                format!(
                    "({id}, '{}', '{}', '{}', '{}', {}, {}, '{now}')",
                    p.external_id(*id),
                    issue_date(*id),
                    due_date(*id),
                    d.currency,
                    money(d.cents),
                    money(d.cents)
                )
            })
            .collect();
        let table = format!("src_{}", p.name);
        for chunk in rows.chunks(500) {
            let values = chunk.join(", ");
            let sql = if p.kind == Kind::Postgres {
                format!(
                    "INSERT INTO {table} VALUES {values} ON CONFLICT (id) DO UPDATE SET currency = excluded.currency, \
                     total = excluded.total, balance = excluded.balance, updated_at = excluded.updated_at"
                )
            } else {
                format!(
                    "SET time_zone = '+00:00'; INSERT INTO {table} VALUES {values} ON DUPLICATE KEY UPDATE currency = VALUES(currency), \
                     total = VALUES(total), balance = VALUES(balance), updated_at = VALUES(updated_at)"
                )
            };
            self.run_sql(p.kind, sql).await;
        }
    }

    /// Runs `sql` in the source database of a PostgreSQL or MariaDB pipeline.
    async fn run_sql(&self, kind: Kind, sql: String) {
        if kind == Kind::Postgres {
            let mut conn = self.pg.connect().await;
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("source SQL");
        } else {
            let mut conn = self.my.connect().await;
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("source SQL");
        }
    }

    /// Puts documents `ids` (new or changed) into the fake service, stamped now.
    fn change_saas(&self, p: &Soaked, ids: Vec<u64>) {
        match p.kind {
            Kind::QuickBooks => {
                let updated = chrono::Utc::now()
                    .with_timezone(&chrono::FixedOffset::west_opt(8 * 3600).expect("tz"))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
                self.qbo[&p.name].with(|b| {
                    let records = b.records.entry("Invoice".into()).or_default();
                    for id in ids {
                        let record = qbo_invoice(id, &p.docs[&id], &updated);
                        match records
                            .iter_mut()
                            .find(|r| r["Id"] == json!(id.to_string()))
                        {
                            Some(r) => *r = record,
                            None => records.push(record),
                        }
                    }
                });
            }
            Kind::Odoo => {
                let written = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
                self.odoo[&p.name].with(|db| {
                    let records = db.records.entry("account.move".into()).or_default();
                    for id in ids {
                        let record = odoo_move(id, &p.docs[&id], &written);
                        match records.iter_mut().find(|r| r["id"] == json!(id)) {
                            Some(r) => *r = record,
                            None => records.push(record),
                        }
                    }
                });
            }
            _ => unreachable!("not a service"),
        }
    }

    /// Changes a few documents of `p` and adds a few, in its source.
    async fn change(&self, p: &mut Soaked, rng: &mut Rng) {
        let mut touched = Vec::new();
        let existing: Vec<u64> = p.docs.keys().copied().collect();
        for _ in 0..1 + rng.below(8) {
            let id = existing[rng.below(existing.len() as u64) as usize];
            let d = p.docs.get_mut(&id).expect("doc");
            d.cents = 1_000 + rng.below(2_000_000) as i64;
            if rng.below(4) == 0 {
                d.currency = CURRENCIES[rng.below(3) as usize];
            }
            d.version += 1;
            touched.push(id);
        }
        for _ in 0..rng.below(20) {
            let id = p.next_id;
            p.next_id += 1;
            p.docs.insert(id, new_doc(rng));
            touched.push(id);
        }
        touched.sort_unstable();
        touched.dedup();
        match p.kind {
            Kind::Csv | Kind::Xlsx => self.write_file(p),
            Kind::Postgres | Kind::Mysql => self.upsert_sql(p, touched).await,
            Kind::QuickBooks | Kind::Odoo => self.change_saas(p, touched),
        }
    }
}

const SQL_TABLE: &str = "(id bigint PRIMARY KEY, external_id varchar(40) NOT NULL, issue_date date NOT NULL, due_date date NOT NULL, \
    currency char(3) NOT NULL, total decimal(12,2) NOT NULL, balance decimal(12,2) NOT NULL, updated_at timestamp(6) NOT NULL)";

fn xlsx_date(d: chrono::NaiveDate) -> rust_xlsxwriter::ExcelDateTime {
    use chrono::Datelike;
    rust_xlsxwriter::ExcelDateTime::from_ymd(d.year() as u16, d.month() as u8, d.day() as u8)
        .expect("date")
}

fn number(cents: i64) -> Value {
    serde_json::from_str(&money(cents)).expect("number")
}

fn qbo_invoice(id: u64, d: &Doc, updated: &str) -> Value {
    json!({
        "Id": id.to_string(),
        "SyncToken": d.version.to_string(),
        "DocNumber": format!("INV-{id}"),
        "TxnDate": issue_date(id).to_string(),
        "DueDate": due_date(id).to_string(),
        "CustomerRef": { "value": (id % 400).to_string(), "name": format!("Customer {}", id % 400) },
        "CurrencyRef": { "value": d.currency, "name": d.currency },
        "TotalAmt": number(d.cents),
        "Balance": number(d.cents),
        "Line": [{ "Amount": number(d.cents), "DetailType": "SalesItemLineDetail" }],
        "MetaData": { "CreateTime": updated, "LastUpdatedTime": updated },
    })
}

fn odoo_move(id: u64, d: &Doc, written: &str) -> Value {
    let currency_id = 1 + CURRENCIES
        .iter()
        .position(|c| *c == d.currency)
        .expect("currency");
    json!({
        "id": id,
        "name": format!("INV/2026/{id:05}"),
        "move_type": "out_invoice",
        "state": "posted",
        "partner_id": [100 + id % 300, format!("Partner {}", id % 300)],
        "invoice_date": issue_date(id).to_string(),
        "invoice_date_due": due_date(id).to_string(),
        "currency_id": [currency_id, d.currency],
        "amount_total": number(d.cents),
        "amount_residual": number(d.cents),
        "write_date": written,
    })
}

/// What the soak did, for its report.
#[derive(Default, Debug)]
struct Injected {
    workers_killed: usize,
    schedulers_killed: usize,
    redis_restarts: usize,
    warehouse_pauses: usize,
    source_changes: usize,
    api: BTreeMap<u16, usize>,
    api_unreachable: usize,
    /// (epoch ms, what) of each fault.
    events: Vec<(i64, String)>,
}

impl Injected {
    fn note(&mut self, what: String) {
        self.events
            .push((chrono::Utc::now().timestamp_millis(), what));
    }
}

/// The log lines of every process that mention `needle`.
fn grep_logs(dir: &Path, needle: &str) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(needle)) {
            out.push_str(&format!(
                "{}: {line}\n",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    out
}

/// The worker and scheduler processes, each slot started again after it is killed.
struct Processes {
    process: WorkerProcess,
    data: PathBuf,
    logs: PathBuf,
    /// (is a worker, the process, when it may be started again after a kill)
    slots: Vec<(bool, Option<Child>, Option<Instant>)>,
}

impl Processes {
    fn spawn(&self, slot: usize) -> Child {
        let (worker, ..) = self.slots[slot];
        let command: &[&str] = if worker {
            &["worker", "--concurrency", "1"]
        } else {
            &["scheduler"]
        };
        let log = self.logs.join(format!("{}-{slot}.log", command[0]));
        sluice_process_logged(&self.process, &self.data, command, Some(&log))
    }

    fn start_all(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].1.is_none() {
                let child = self.spawn(slot);
                self.slots[slot].1 = Some(child);
                self.slots[slot].2 = None;
            }
        }
    }

    /// Kills one running process with `kill -9`; it is started again in a second or two.
    fn kill_one(&mut self, rng: &mut Rng, injected: &mut Injected) {
        let running: Vec<usize> = (0..self.slots.len())
            .filter(|s| self.slots[*s].1.is_some())
            .collect();
        if running.is_empty() {
            return;
        }
        let slot = running[rng.below(running.len() as u64) as usize];
        let mut child = self.slots[slot].1.take().expect("running");
        kill_9(&mut child);
        self.slots[slot].2 = Some(Instant::now() + Duration::from_millis(1000 + rng.below(1500)));
        if self.slots[slot].0 {
            injected.workers_killed += 1;
        } else {
            injected.schedulers_killed += 1;
        }
        injected.note(format!("kill -9 slot {slot}"));
    }

    fn restart_due(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].1.is_none()
                && self.slots[slot].2.is_some_and(|at| Instant::now() >= at)
            {
                let child = self.spawn(slot);
                self.slots[slot].1 = Some(child);
                self.slots[slot].2 = None;
            }
        }
    }

    fn stop_schedulers(&mut self) {
        for (worker, child, again) in &mut self.slots {
            if !*worker {
                if let Some(mut c) = child.take() {
                    kill_9(&mut c);
                }
                *again = None;
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.slots {
            if let Some(c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// Makes an operator key of `tenant` with the CLI.
fn operator_key(database_url: &str, data: &Path, tenant: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--data-dir")
        .arg(data)
        .args(["--database-url", database_url])
        .args(["key", "create", "--tenant", tenant, "--role", "operator"])
        .env("SLUICE_MASTER_KEY", MASTER_KEY_HEX)
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("sluice key create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the chaos soak runs through scripts/chaos (scripts/test runs it for 2 minutes)"]
async fn chaos_soak() {
    let secs: u64 = std::env::var("SLUICE_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("SLUICE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis() as u64);
    println!("chaos soak: {secs} s, seed {seed}");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tmp");
    // The processes' logs outlive a failed soak (removed when it passes).
    let logs = std::env::temp_dir().join(format!("sluice-chaos-{seed}-{}", std::process::id()));
    println!("logs in {}", logs.display());
    let data = dir.path().join("data");
    let redis_dir = dir.path().join("redis");
    for d in [&logs, &data, &redis_dir] {
        std::fs::create_dir_all(d).expect("dir");
    }

    // The warehouse, reached by every sluice process through a proxy that can pause it.
    let db = TestDb::create().await;
    let w = PostgresWarehouse::connect(&db.url)
        .await
        .expect("warehouse")
        .with_master_key(master());
    let proxy =
        std::sync::Arc::new(StallProxy::start("127.0.0.1:5432".parse().expect("addr")).await);
    let proxied_url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(
        proxied_url, db.url,
        "the warehouse URL goes through the proxy"
    );
    let mut redis = PrivateRedis::start(&redis_dir);

    // The pipelines and their sources.
    let mut sources = Sources {
        dir: dir.path().to_path_buf(),
        pg: TestDb::create().await,
        my: TestMysql::create().await,
        qbo: HashMap::new(),
        odoo: HashMap::new(),
    };
    let mut kinds: Vec<(Kind, bool)> = MIX
        .iter()
        .flat_map(|(k, n)| std::iter::repeat_n((*k, false), *n))
        .collect();
    kinds.push((Kind::QuickBooks, true));
    let mut pipelines = Vec::new();
    for (i, (kind, planted)) in kinds.into_iter().enumerate() {
        let n = 200 + rng.below(600);
        let mut p = Soaked {
            name: format!("p{:02}", i + 1),
            tenant: format!("t{:02}", i + 1),
            kind,
            docs: BTreeMap::new(),
            next_id: n + 1,
            planted,
        };
        for id in 1..=n {
            p.docs.insert(id, new_doc(&mut rng));
        }
        w.create_tenant(&slug(&p.tenant), &p.tenant, &master())
            .await
            .expect("tenant");
        let cron = format!("*/{} * * * * *", 3 + i % 4);
        let spec = sources
            .create(&p, 50 + rng.below(200) as usize, &cron)
            .await;
        register(&w, &spec).await;
        pipelines.push(p);
    }

    // sluice serve (API, a worker and a scheduler), three workers and two schedulers.
    let process = WorkerProcess {
        database_url: Some(proxied_url.clone()),
        redis: Some((redis.url(), PREFIX.to_string())),
        retry_base_ms: 500,
        lease_ms: 10_000,
    };
    let listen = format!("127.0.0.1:{}", free_port());
    let serve_log = logs.join("serve.log");
    let mut serve = Reaper(vec![sluice_process_logged(
        &process,
        &data,
        &["serve", "--listen", &listen],
        Some(&serve_log),
    )]);
    let mut procs = Processes {
        process,
        data: data.clone(),
        logs: logs.clone(),
        slots: vec![
            (true, None, None),
            (true, None, None),
            (true, None, None),
            (false, None, None),
            (false, None, None),
        ],
    };
    procs.start_all();
    let queues = Queues::connect(settings(Some((&redis.url(), PREFIX)), &data))
        .await
        .expect("queues");
    let api = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let base = format!("http://{listen}");
    eventually(Duration::from_secs(60), "the API answers", || async {
        api.get(format!("{base}/health")).send().await.is_ok()
    })
    .await;
    let keys: Vec<(usize, String)> = [0usize, 7, 13, 20, 26]
        .iter()
        .map(|i| (*i, operator_key(&db.url, &data, &pipelines[*i].tenant)))
        .collect();

    // The chaos.
    let mut injected = Injected::default();
    /// (pipeline, a trigger?, status and run if answered)
    type Answers = Vec<(String, bool, Option<(u16, Option<String>)>)>;
    let answers: std::sync::Arc<std::sync::Mutex<Answers>> = Default::default();
    let mut clients = tokio::task::JoinSet::new();
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let mut step = 0u64;
    let mut redis_down_until: Option<Instant> = None;
    while Instant::now() < end {
        step += 1;
        let tick = Instant::now();
        // A source changes (never the planted one's).
        let i = rng.below(pipelines.len() as u64 - 1) as usize;
        sources.change(&mut pipelines[i], &mut rng).await;
        injected.source_changes += 1;
        // A worker or scheduler dies.
        if step.is_multiple_of(3) {
            procs.kill_one(&mut rng, &mut injected);
        }
        procs.restart_due();
        // Redis goes away for two seconds now and then.
        if step % 25 == 12 {
            redis.stop();
            redis_down_until = Some(Instant::now() + Duration::from_secs(2));
            injected.redis_restarts += 1;
            injected.note("redis stopped".into());
        }
        if redis_down_until.is_some_and(|t| Instant::now() >= t) {
            redis.start_again();
            redis_down_until = None;
            injected.note("redis started".into());
        }
        // The warehouse connection pauses (no data, no reset) for two seconds.
        if step % 20 == 7 {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.stall_for(Duration::from_secs(2)).await });
            injected.warehouse_pauses += 1;
            injected.note("warehouse paused".into());
        }
        // Operators read lists and trigger syncs (beside the loop, which keeps its pace).
        let (i, key) = keys[rng.below(keys.len() as u64) as usize].clone();
        let name = pipelines[i].name.clone();
        let (api, base, answers) = (api.clone(), base.clone(), answers.clone());
        clients.spawn(async move {
            for (post, path) in [
                (false, "/v1/runs?limit=20".to_string()),
                (false, "/v1/quarantine?limit=20".to_string()),
                (true, format!("/v1/pipelines/{name}/sync")),
            ] {
                let req = if post {
                    api.post(format!("{base}{path}"))
                } else {
                    api.get(format!("{base}{path}"))
                };
                let answer = match req.bearer_auth(&key).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let run = if post && status == 202 {
                            let body: Value = r.json().await.expect("json");
                            Some(body["run_id"].as_str().expect("run_id").to_string())
                        } else {
                            None
                        };
                        Some((status, run))
                    }
                    Err(_) => None,
                };
                answers
                    .lock()
                    .expect("answers")
                    .push((name.clone(), post, answer));
            }
        });
        if tick.elapsed() > Duration::from_secs(2) {
            println!("step {step} took {:?}", tick.elapsed());
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }

    while clients.join_next().await.is_some() {}
    let mut api_runs: HashMap<String, BTreeSet<String>> = HashMap::new();
    // Triggers answered 503 (or not at all) may still have queued a run: its job is pushed
    // by the next trigger of the pipeline (a client that retries joins it).
    let mut unanswered: HashMap<String, usize> = HashMap::new();
    for (name, post, answer) in answers.lock().expect("answers").drain(..) {
        match answer {
            Some((status, run)) => {
                *injected.api.entry(status).or_default() += 1;
                if let Some(run) = run {
                    api_runs.entry(name.clone()).or_default().insert(run);
                }
                if post && status == 503 {
                    *unanswered.entry(name).or_default() += 1;
                }
            }
            None => {
                injected.api_unreachable += 1;
                if post {
                    *unanswered.entry(name).or_default() += 1;
                }
            }
        }
    }

    // The API said it was unavailable (503) while Redis or the warehouse was away, never
    // that it failed (500).
    assert!(
        injected.api.keys().all(|s| *s < 500 || *s == 503),
        "API answers: {:?}",
        injected.api
    );

    // Calm: everything back up, the schedulers stopped, then one last sync of each pipeline
    // after its source's last change.
    proxy.resume();
    redis.start_again();
    procs.start_all();
    procs.stop_schedulers();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &serve.0[0].id().to_string()])
        .status();
    let _ = serve.0[0].wait();
    println!("chaos over after {:?}; final syncs", started.elapsed());
    let mut finals = Vec::new();
    for p in &pipelines {
        let req = TriggerRequest {
            tenant: p.tenant.clone(),
            pipeline: p.name.clone(),
            trigger: RunTrigger::Manual,
            idempotency_key: None,
            correlation_id: None,
            file: None,
        };
        // This process's connection to Redis may have broken with the last restart: the
        // first request after one fails, and the connection is made again.
        let mut tries = 0;
        let triggered = loop {
            match queues.trigger(&req).await {
                Ok(t) => break t,
                Err(e) if tries < 10 => {
                    tries += 1;
                    println!("final trigger of {}: {e}; again", p.name);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("final trigger of {}: {e}", p.name),
            }
        };
        finals.push(triggered.run_id);
    }
    for (p, run) in pipelines.iter().zip(&finals) {
        let result = tokio::time::timeout(Duration::from_secs(300), async {
            loop {
                if let Ok(r) = queues.wait(run, Duration::from_millis(200)).await {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}'s final sync did not end; worker log: {}",
                p.name,
                tail(&logs.join("worker-0.log"), 20)
            )
        });
        let expected = if p.planted {
            JobStatus::Dead
        } else {
            JobStatus::Succeeded
        };
        assert_eq!(
            result.status, expected,
            "{}'s final sync: {result:?}",
            p.name
        );
    }

    // No job stuck, no lock held. A queue's depth counts waiting jobs only: a job taken
    // over from a killed worker may still be in flight, waiting for the pipeline lock that
    // a run queued behind it took when the dead worker's lease lapsed; it closes its
    // attempt's ledger once it gets the lock. So every run must also have ended.
    eventually(Duration::from_secs(60), "the queues drained", || async {
        queues.depth(QueueName::Sync).await.ok() == Some(0)
            && queues.depth(QueueName::Replay).await.ok() == Some(0)
    })
    .await;
    eventually(Duration::from_secs(90), "every run ended", || async {
        let mut ended = true;
        for p in &pipelines {
            let runs = w
                .runs(&slug(&p.tenant), Some(&p.name), 100_000)
                .await
                .unwrap_or_default();
            ended &= runs.iter().all(|r| r.status != RunStatus::Running);
        }
        ended
    })
    .await;
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let locks: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}:lock:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(
        locks.is_empty(),
        "locks held after every job ended: {locks:?}"
    );

    // Every warehouse table equals its source; each tick ran once; dead letters planted.
    let mut report = Report::default();
    for (p, final_run) in pipelines.iter().zip(&finals) {
        let tenant = slug(&p.tenant);
        let runs = w.runs(&tenant, Some(&p.name), 100_000).await.expect("runs");
        assert!(
            runs.iter().all(|r| r.status != RunStatus::Running),
            "{}: a run still says running: {:?}",
            p.name,
            runs.iter().find(|r| r.status == RunStatus::Running)
        );
        let letters = w.dead_letters(&tenant, 10_000).await.expect("dead letters");
        if p.planted {
            assert!(
                !letters.is_empty(),
                "the planted pipeline has its dead letters"
            );
            report.planted_dead += letters.len();
        } else {
            assert!(
                letters.is_empty(),
                "{} ({:?}) has dead letters it was not planted with: {:?}",
                p.name,
                p.kind,
                letters.iter().map(|l| &l.reason).collect::<Vec<_>>()
            );
            let loaded: BTreeMap<String, (String, Decimal)> = w
                .invoices(&tenant)
                .await
                .expect("invoices")
                .into_iter()
                .map(|i| (i.external_id, (i.currency, i.total)))
                .collect();
            let expected = p.expected();
            if loaded != expected {
                let missing: Vec<_> = expected
                    .keys()
                    .filter(|k| !loaded.contains_key(*k))
                    .take(5)
                    .collect();
                let extra: Vec<_> = loaded
                    .keys()
                    .filter(|k| !expected.contains_key(*k))
                    .take(5)
                    .collect();
                let differ: Vec<_> = expected
                    .iter()
                    .filter(|(k, v)| loaded.get(*k).is_some_and(|l| l != *v))
                    .take(5)
                    .collect();
                panic!(
                    "{} ({:?}): the warehouse holds {} documents, the source {}; missing {missing:?}, extra {extra:?}, differing {differ:?}",
                    p.name,
                    p.kind,
                    loaded.len(),
                    expected.len()
                );
            }
            report.documents += expected.len();
        }
        let ticks = cron_ticks(&redis.url(), PREFIX, &p.tenant, &p.name).await;
        let mut jobs_of_ticks = BTreeSet::new();
        for (at, run) in &ticks {
            // A tick's job whose worker was killed is taken over once its heartbeat lapses:
            // wait for every job to end before reading its ledger.
            let ended = job_ended(&queues, run, Duration::from_secs(120)).await;
            assert!(
                ended.is_some(),
                "{}: tick {at}'s job {run} never ended",
                p.name
            );
            let Some(job) = w.job(&tenant, run).await.expect("job") else {
                let state = lock_state(&redis.url(), &p.tenant, &p.name).await;
                panic!(
                    "{}: tick {at}'s run {run} never ran; its lock and the run queued behind it: {state:?}\nlogs:\n{}\ninjected: {:?}",
                    p.name,
                    grep_logs(&logs, run),
                    injected.events
                );
            };
            let whole = job.whole();
            assert!(
                whole.started_at.timestamp_millis() >= *at,
                "{}: tick {at} joined a run that started before it: {whole:?}",
                p.name
            );
            let ended_as_planned = if p.planted {
                whole.status == RunStatus::Failed
            } else {
                whole.status == RunStatus::Succeeded
            };
            assert!(ended_as_planned, "{}: tick {at}'s run {whole:?}", p.name);
            jobs_of_ticks.insert(run.clone());
        }
        let jobs: BTreeSet<String> = runs
            .iter()
            .map(|r| JobLedger::job_id(&r.run_id).to_string())
            .collect();
        let mut asked = jobs_of_ticks.clone();
        asked.extend(api_runs.get(&p.name).into_iter().flatten().cloned());
        asked.insert(final_run.clone());
        let unasked: Vec<_> = jobs.difference(&asked).collect();
        if unasked.len() > unanswered.get(&p.name).copied().unwrap_or(0) {
            let mut logs_of = String::new();
            for run in &unasked {
                logs_of.push_str(&grep_logs(&logs, run));
            }
            panic!(
                "{}: runs nobody asked for (a tick fired twice?): {unasked:?}\nlogs:\n{logs_of}\nAPI answers: {:?}\ninjected: {:?}",
                p.name, injected.api, injected.events
            );
        }
        report.ticks += ticks.len();
        report.jobs += jobs.len();
        report.attempts += runs.len();
        report.rows_read += runs.iter().map(|r| r.counts.rows_read).sum::<u64>();
        *report.by_kind.entry(format!("{:?}", p.kind)).or_default() += jobs.len();
    }
    if std::env::var_os("SLUICE_CHAOS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&logs);
    }
    injected.events.clear();
    println!("injected: {injected:?}");
    println!("checked: {report:?}");
}

/// What the checks covered, for the report.
#[derive(Default, Debug)]
struct Report {
    documents: usize,
    ticks: usize,
    jobs: usize,
    attempts: usize,
    rows_read: u64,
    planted_dead: usize,
    by_kind: BTreeMap<String, usize>,
}

/// The pipeline's lock and the run queued behind it, as Redis holds them.
async fn lock_state(url: &str, tenant: &str, pipeline: &str) -> (Option<String>, Vec<String>) {
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("{PREFIX}:lock:{tenant}:{pipeline}");
    let lock: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("get");
    let next: Vec<String> = redis::cmd("HGETALL")
        .arg(format!("{key}:next"))
        .query_async(&mut conn)
        .await
        .expect("hgetall");
    (lock, next)
}
