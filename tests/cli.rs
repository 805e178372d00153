//! The `sluice` binary as a user meets it: the README's example, `--json` output, exit
//! codes and messages, quarantine and finance commands.

mod support;

use sluice_engine::prelude::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use support::cli::{free_port, sluice, sluice_at};

fn stdout_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        lines.next().is_none(),
        "--json prints exactly one object: {text}"
    );
    serde_json::from_str(first).expect("json")
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

#[test]
fn example_invoices_sync_reports_exact_accounting_as_one_json_object() {
    let data = tempfile::tempdir().expect("tmp");
    let out = sluice(
        data.path(),
        &[
            "sync",
            example("invoices.toml").to_str().expect("path"),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = stdout_json(&out);
    // 26 records: 16 distinct good invoices, 8 bad rows, 2 repeats.
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["rows_read"], 26);
    assert_eq!(j["inserted"], 16);
    assert_eq!(j["loaded"], 16);
    assert_eq!(j["quarantined"], 8);
    assert_eq!(j["deduplicated"], 2);
    for key in ["run_id", "updated", "unchanged", "duration_ms"] {
        assert!(j.get(key).is_some(), "missing {key}");
    }

    let again = stdout_json(&sluice(
        data.path(),
        &[
            "sync",
            example("invoices.toml").to_str().expect("path"),
            "--json",
        ],
    ));
    assert_eq!(
        (
            again["inserted"].as_u64(),
            again["updated"].as_u64(),
            again["unchanged"].as_u64()
        ),
        (Some(0), Some(0), Some(16))
    );

    let run = j["run_id"].as_str().expect("run id");
    let listed = sluice(
        data.path(),
        &[
            "quarantine",
            "list",
            "--run",
            again["run_id"].as_str().expect("id"),
            "--json",
        ],
    );
    let rows = stdout_json(&listed);
    let rows = rows.as_array().expect("array");
    assert_eq!(
        rows.len(),
        8,
        "the re-run's bad rows are the same 8 entries, not copies"
    );
    assert!(
        rows.iter().all(|r| r["run_id"] != run),
        "re-reading moved each entry to the latest run"
    );
    let ragged = rows
        .iter()
        .find(|r| r["errors"][0]["rule"] == "ragged_row")
        .expect("ragged row quarantined");
    assert_eq!(ragged["position"]["row"], 26);
    let id = rows[0]["id"].as_str().expect("id");
    let shown = stdout_json(&sluice(data.path(), &["quarantine", "show", id, "--json"]));
    assert_eq!(shown["id"], id);
    assert!(
        shown["raw"].get("InvoiceId").is_some(),
        "raw values keep the source column names"
    );
}

#[test]
fn example_bills_workbook_and_aging_json() {
    let data = tempfile::tempdir().expect("tmp");
    let out = sluice(
        data.path(),
        &[
            "sync",
            example("bills.toml").to_str().expect("path"),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = stdout_json(&out);
    assert_eq!(
        (
            j["rows_read"].as_u64(),
            j["loaded"].as_u64(),
            j["quarantined"].as_u64(),
            j["deduplicated"].as_u64()
        ),
        (Some(10), Some(6), Some(3), Some(1))
    );

    let aging = stdout_json(&sluice(
        data.path(),
        &[
            "finance",
            "ap-aging",
            "--tenant",
            "acme",
            "--as-of",
            "2024-06-30",
            "--json",
        ],
    ));
    assert_eq!(aging["as_of"], "2024-06-30");
    // B-501 (latest version: 900.00 open, due 2024-04-03: 88 days) ; B-503 1250.00 due 06-01 (29 days);
    // B-504 1100.00 due 07-01 (current); B-506 credit note 150.00 due 05-15 (46 days) counts negative.
    let usd = &aging["currencies"]["USD"];
    assert_eq!(usd["current"], "1100.00");
    assert_eq!(usd["1_30"], "1250.00");
    assert_eq!(usd["31_60"], "-150.00");
    assert_eq!(usd["61_90"], "900.00");
    assert_eq!(usd["over_90"], "0.00");
    assert_eq!(aging["currencies"]["EUR"]["31_60"], "650.40");
    assert!(
        aging["currencies"].get("GBP").is_none(),
        "a fully paid bill is not open"
    );
}

#[test]
fn a_missing_file_fails_with_a_clear_message_and_commits_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, "name = \"x\"\ntenant = \"acme\"\nentity = \"invoices\"\n[source]\nkind = \"csv\"\npath = \"nope.csv\"\n").expect("write");
    let data = dir.path().join("data");
    let out = sluice(&data, &["sync", pipeline.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("file not found") && err.contains("nope.csv"),
        "{err}"
    );
    let json = stdout_json(&sluice(
        &data,
        &["sync", pipeline.to_str().expect("path"), "--json"],
    ));
    assert_eq!(json["status"], "failed");
    assert_eq!(json["retryable"], false);
    let aging = stdout_json(&sluice(
        &data,
        &[
            "finance",
            "ar-aging",
            "--tenant",
            "acme",
            "--as-of",
            "2024-06-30",
            "--json",
        ],
    ));
    assert_eq!(
        aging["currencies"],
        serde_json::json!({}),
        "nothing was loaded"
    );
}

#[test]
fn bad_pipeline_files_are_rejected_before_any_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        ("tenant = \"Acme Corp\"", "invalid tenant slug"),
        (
            "tenant = \"acme\"\n[mapping]\ncustomer = \"X\"",
            "no field 'customer'",
        ),
        (
            "tenant = \"acme\"\n[rules]\ndisable = [\"required\"]",
            "cannot be switched off",
        ),
        ("tenant = \"acme\"\npth = \"x\"", "unknown field"),
    ];
    for (i, (extra, message)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("p{i}.toml"));
        std::fs::write(&p, format!("name = \"x\"\nentity = \"invoices\"\n{extra}\n[source]\nkind = \"csv\"\npath = \"a.csv\"\n")).expect("write");
        let out = sluice(
            &dir.path().join("data"),
            &["sync", p.to_str().expect("path")],
        );
        assert!(!out.status.success(), "case {i} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(message),
            "case {i}: expected {message:?} in {err}"
        );
    }
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

#[test]
fn every_command_has_help_with_an_example() {
    for args in [
        vec!["--help"],
        vec!["sync", "--help"],
        vec!["quarantine", "list", "--help"],
        vec!["quarantine", "show", "--help"],
        vec!["finance", "ar-aging", "--help"],
        vec!["finance", "ap-aging", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(&args)
            .output()
            .expect("run");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{args:?} help has no example:\n{text}"
        );
    }
}

#[test]
fn an_unreachable_postgres_is_a_clear_retryable_failure_that_never_prints_the_password() {
    let data = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--database-url",
            "postgres://sluice:s3cret-pw@127.0.0.1:1/nowhere",
            "sync",
        ])
        .arg(example("invoices.toml"))
        .env("SLUICE_DATA_DIR", data.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("warehouse unavailable"), "{all}");
    assert!(!all.contains("s3cret-pw"), "password leaked: {all}");
}

#[tokio::test]
async fn postgres_flow_from_the_command_line() {
    let db = support::pg::TestDb::create().await;
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .env("SLUICE_DATABASE_URL", &db.url)
            .env("SLUICE_MASTER_KEY", support::pg::MASTER_KEY_HEX)
            .output()
            .expect("run")
    };
    let before = run(&["sync", example("invoices.toml").to_str().expect("path")]);
    assert!(!before.status.success());
    assert!(
        String::from_utf8_lossy(&before.stderr).contains("sluice migrate"),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    assert!(run(&["migrate"]).status.success());
    let created = run(&["tenant", "create", "acme", "--name", "Acme Corp"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let listed = stdout_json(&run(&["tenant", "list", "--json"]));
    assert_eq!(listed[0]["slug"], "acme");
    assert_eq!(listed[0]["schema"], "tenant_acme");
    let j = stdout_json(&run(&[
        "sync",
        example("invoices.toml").to_str().expect("path"),
        "--json",
    ]));
    assert_eq!(
        (
            j["rows_read"].as_u64(),
            j["inserted"].as_u64(),
            j["quarantined"].as_u64(),
            j["deduplicated"].as_u64()
        ),
        (Some(26), Some(16), Some(8), Some(2))
    );
    let aging = stdout_json(&run(&[
        "finance",
        "ar-aging",
        "--tenant",
        "acme",
        "--as-of",
        "2024-06-30",
        "--json",
    ]));
    assert_eq!(aging["currencies"]["EUR"]["over_90"], "2000.00");
    let q = stdout_json(&run(&["quarantine", "list", "--json"]));
    assert_eq!(q.as_array().map(Vec::len), Some(8));
}

#[tokio::test]
async fn runs_and_dead_letters_from_the_command_line() {
    let data = tempfile::tempdir().expect("tmp");
    let synced = stdout_json(&sluice(
        data.path(),
        &[
            "sync",
            example("invoices.toml").to_str().expect("path"),
            "--json",
        ],
    ));
    let runs = stdout_json(&sluice(data.path(), &["runs", "list", "--json"]));
    assert_eq!(runs[0]["run_id"], synced["run_id"]);
    assert_eq!(runs[0]["rows_read"], 26);
    let shown = stdout_json(&sluice(
        data.path(),
        &[
            "runs",
            "show",
            synced["run_id"].as_str().expect("id"),
            "--json",
        ],
    ));
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["loaded"], synced["loaded"]);

    // A dead sync job of the example pipeline, as the workers record one.
    let warehouse = sluice_engine::SqliteWarehouse::new(data.path());
    let job = sluice_workers::jobs::SyncJob::new(
        "acme",
        "acme-invoices",
        sluice_engine::RunTrigger::Cron,
    );
    warehouse
        .record_dead_letter(&sluice_engine::control::DeadLetter {
            id: "dl-cli".into(),
            tenant: "acme".into(),
            pipeline: "acme-invoices".into(),
            job_kind: "sync".into(),
            job: serde_json::to_value(&job).expect("job"),
            attempts: serde_json::json!([{ "number": 1, "at": "2024-06-30T00:00:00Z", "error": "connection reset", "transient": true }]),
            reason: "all 5 attempts failed".into(),
            created_at: chrono::Utc::now(),
            replayed_at: None,
            replay_run: None,
        })
        .await
        .expect("record");
    let listed =
        String::from_utf8_lossy(&sluice(data.path(), &["dead-letters", "list"]).stdout).to_string();
    assert!(
        listed.contains("dl-cli") && listed.contains("connection reset"),
        "{listed}"
    );
    let replayed = stdout_json(&sluice(
        data.path(),
        &[
            "dead-letters",
            "replay",
            "dl-cli",
            "--pipeline",
            example("invoices.toml").to_str().expect("path"),
            "--json",
        ],
    ));
    assert_eq!(replayed["status"], "replayed");
    assert_eq!(replayed["run"]["trigger"], "replay");
    // The first replay registered the pipeline: no file needed any more.
    let again = sluice(data.path(), &["dead-letters", "replay", "dl-cli"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already replayed"));
}

#[test]
fn trigger_queues_a_sync_joins_it_and_waits_for_it_on_the_embedded_queue() {
    let data = tempfile::tempdir().expect("tmp");
    let file = example("invoices.toml");
    let file = file.to_str().expect("path");
    let other = tempfile::tempdir().expect("tmp");
    let synced = stdout_json(&sluice(other.path(), &["sync", file, "--json"]));

    // --wait runs the job (no worker is running) and prints what `sync --json` prints,
    // the job whole, with its attempts beneath.
    let waited = stdout_json(&sluice(data.path(), &["trigger", file, "--wait", "--json"]));
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.retain(|k| k != "attempts");
        k.sort();
        k
    };
    assert_eq!(keys(&waited), keys(&synced));
    assert_eq!(waited["attempts"].as_array().map(Vec::len), Some(1));
    assert_eq!(waited["attempts"][0]["run_id"], waited["run_id"]);
    assert_eq!(waited["status"], "succeeded");
    assert_eq!(waited["inserted"], 16);
    assert_eq!(waited["quarantined"], 8);

    // By name: queued; a second trigger joins the queued run.
    let by_name = ["trigger", "acme-invoices", "--tenant", "acme", "--json"];
    let queued = stdout_json(&sluice(data.path(), &by_name));
    assert_eq!(queued["outcome"], "enqueued");
    let joined = stdout_json(&sluice(data.path(), &by_name));
    assert_eq!(joined["outcome"], "joined");
    assert_eq!(joined["run_id"], queued["run_id"]);
    // Waiting joins it too, runs it here, and reports that run.
    let done = stdout_json(&sluice(
        data.path(),
        &[
            "trigger",
            "acme-invoices",
            "--tenant",
            "acme",
            "--wait",
            "--json",
        ],
    ));
    assert_eq!(done["run_id"], queued["run_id"]);
    assert_eq!(done["unchanged"], 16);
    let runs = stdout_json(&sluice(data.path(), &["runs", "list", "--json"]));
    assert_eq!(runs.as_array().map(Vec::len), Some(2));
    assert_eq!(runs[0]["trigger"], "manual");

    // An idempotency key returns the run it produced the first time.
    let keyed = [
        "trigger",
        "acme-invoices",
        "--tenant",
        "acme",
        "--idempotency-key",
        "close-2024-06",
        "--wait",
        "--json",
    ];
    let first = stdout_json(&sluice(data.path(), &keyed));
    let repeat = stdout_json(&sluice(data.path(), &keyed));
    assert_eq!(first["run_id"], repeat["run_id"]);
    let runs = stdout_json(&sluice(data.path(), &["runs", "list", "--json"]));
    assert_eq!(runs.as_array().map(Vec::len), Some(3));

    let unknown = sluice(data.path(), &["trigger", "nope", "--tenant", "acme"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("not registered"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}

#[tokio::test]
async fn quarantined_rows_are_replayed_after_a_fix_and_stay_pending_otherwise() {
    use sqlx::Connection;
    let data = tempfile::tempdir().expect("tmp");
    let file = example("invoices.toml");
    let synced = stdout_json(&sluice(
        data.path(),
        &["trigger", file.to_str().expect("path"), "--wait", "--json"],
    ));
    assert_eq!(synced["quarantined"], 8);
    let replay = |extra: &[&str]| {
        let mut args = vec![
            "quarantine",
            "replay",
            "--tenant",
            "acme",
            "--pipeline",
            "acme-invoices",
            "--wait",
            "--json",
        ];
        args.extend_from_slice(extra);
        stdout_json(&sluice(data.path(), &args))
    };

    // Nothing fixed: every row fails again, stays pending with its errors, no copies.
    let first = replay(&[]);
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["rows_read"], 8);
    assert_eq!(first["quarantined"], 8);
    assert_eq!(first["loaded"], 0);
    let rows = stdout_json(&sluice(data.path(), &["quarantine", "list", "--json"]));
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 8);
    assert!(rows.iter().all(|r| r["status"] == "pending"));

    // An admin fixes the bad currency of one row (what the API's PATCH will do).
    let bad = rows
        .iter()
        .find(|r| r["errors"][0]["rule"] == "currency_code")
        .expect("a currency error");
    let id = bad["id"].as_str().expect("id");
    let url = format!(
        "sqlite://{}",
        data.path().join("tenants/acme.sqlite").display()
    );
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("open");
    sqlx::query(
        "UPDATE quarantine SET raw = json_set(raw, '$.Currency', 'USD'), status = 'fixed' WHERE id = ?",
    )
    .bind(id)
    .execute(&mut conn)
    .await
    .expect("fix");
    drop(conn);

    let fixed = replay(&["--id", id]);
    assert_eq!(fixed["rows_read"], 1);
    assert_eq!(fixed["inserted"], 1);
    assert_eq!(fixed["quarantined"], 0);
    let shown = stdout_json(&sluice(data.path(), &["quarantine", "show", id, "--json"]));
    assert_eq!(shown["status"], "replayed");
    let runs = stdout_json(&sluice(data.path(), &["runs", "list", "--json"]));
    assert!(
        runs.as_array()
            .expect("runs")
            .iter()
            .any(|r| r["trigger"] == "replay")
    );
    let pending = stdout_json(&sluice(
        data.path(),
        &["quarantine", "list", "--status", "pending", "--json"],
    ));
    assert_eq!(pending.as_array().map(Vec::len), Some(7));
    // The replayed invoice is in the warehouse, next to the 16 loaded at first.
    let warehouse = sluice_engine::SqliteWarehouse::new(data.path());
    let tenant = sluice_engine::TenantSlug::parse("acme").expect("slug");
    let invoices = sluice_engine::FinanceStore::invoices(&warehouse, &tenant)
        .await
        .expect("invoices");
    assert_eq!(invoices.len(), 17);
    let again = replay(&["--id", id]);
    assert_eq!(
        again["rows_read"], 0,
        "a replayed row is not replayed twice"
    );
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn serve_runs_queued_syncs_exposes_health_and_metrics_and_stops_on_sigterm() {
    use std::time::{Duration, Instant};
    let data = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let mut serve = sluice_at(data.path())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-sample-secs",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = http_get(port, "/health")
            && r.starts_with("HTTP/1.1 200")
        {
            assert!(r.contains("\"status\":\"ok\""), "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "serve did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let queued = stdout_json(&sluice(
        data.path(),
        &[
            "trigger",
            example("invoices.toml").to_str().expect("path"),
            "--json",
        ],
    ));
    let run = queued["run_id"].as_str().expect("run id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = sluice(data.path(), &["runs", "show", &run, "--json"]);
        if shown.status.success() && stdout_json(&shown)["status"] == "succeeded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve's workers did not run the job"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = http_get(port, "/metrics").expect("metrics");
        if m.contains("sluice_jobs_succeeded_total{queue=\"sync\"} 1") {
            break m;
        }
        assert!(Instant::now() < deadline, "no job in the metrics: {m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metrics.contains("sluice_rows_total{outcome=\"read\"} 26"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_rows_total{outcome=\"quarantined\"} 8"));
    assert!(metrics.contains("sluice_job_duration_seconds_count{queue=\"sync\"} 1"));
    assert!(metrics.contains("sluice_queue_depth"));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_http_requests_total{")
                && l.contains("route=\"/health\"")
                && l.contains("status=\"200\"")),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_http_request_duration_seconds_bucket"));

    // Every metric the committed dashboard and alert rules use is exported, the
    // warehouse-wide ones once the sampler has read the run.
    let used = deployed_metric_names();
    assert!(used.len() >= 10, "{used:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let m = http_get(port, "/metrics").expect("metrics");
        if m.contains("sluice_quarantine_pending_rows{") {
            break m;
        }
        assert!(Instant::now() < deadline, "no warehouse sample: {m}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for name in &used {
        assert!(
            metrics.lines().any(|l| l
                .strip_prefix(name.as_str())
                .is_some_and(|rest| rest.starts_with(['{', ' ']))),
            "{name}, used by deploy/, is not exported:\n{metrics}"
        );
    }
    let last_success = metric_value(
        &metrics,
        "sluice_pipeline_last_success_timestamp_seconds{pipeline=\"acme-invoices\",tenant=\"acme\"}",
    );
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - 120.0..=now + 1.0).contains(&last_success),
        "{last_success}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_pipeline_schedule_interval_seconds{pipeline=\"acme-invoices\",tenant=\"acme\"}",
        ),
        900.0
    );
    let pending: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_quarantine_pending_rows{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(pending >= 8.0, "8 rows quarantined: {metrics}");

    // A worker process serves its own metrics.
    let worker_port = free_port();
    let mut worker = sluice_at(data.path())
        .args([
            "worker",
            "--metrics-listen",
            &format!("127.0.0.1:{worker_port}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker");
    let deadline = Instant::now() + Duration::from_secs(30);
    let worker_metrics = loop {
        if let Some(m) = http_get(worker_port, "/metrics")
            && m.starts_with("HTTP/1.1 200")
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's metrics did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        worker_metrics.contains("sluice_jobs_started_total{queue=\"sync\"} 0"),
        "{worker_metrics}"
    );
    assert!(worker_metrics.contains("sluice_runs_total{status=\"failed\"} 0"));
    let _ = worker.kill();
    let _ = worker.wait();

    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = serve.kill();
            panic!("serve did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

/// Every `sluice_*` metric name the committed Grafana dashboard and Prometheus rules use.
fn deployed_metric_names() -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut names = std::collections::BTreeSet::new();
    for file in ["grafana/sluice.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).expect("deploy file");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("sluice_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

/// The value of the series written exactly as `series` in a scrape.
fn metric_value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in:\n{scrape}"))
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    let data = tempfile::tempdir().expect("tmp");
    let bash = sluice(data.path(), &["completions", "bash"]);
    assert!(bash.status.success());
    let bash = String::from_utf8_lossy(&bash.stdout);
    assert!(bash.contains("_sluice()"), "{bash}");
    for sub in ["sync", "master-key", "dead-letters", "backup"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    let zsh = sluice(data.path(), &["completions", "zsh"]);
    assert!(String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef sluice"));
    let fish = sluice(data.path(), &["completions", "fish"]);
    assert!(String::from_utf8_lossy(&fish.stdout).contains("complete -c sluice"));
    let unknown = sluice(data.path(), &["completions", "tcsh"]);
    assert_eq!(unknown.status.code(), Some(2), "a usage error exits 2");

    let man = sluice(data.path(), &["man"]);
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.contains(".TH sluice 1"), "{page}");
    assert!(
        page.contains("Exit status"),
        "the exit codes are documented"
    );
    let dir = data.path().join("man1");
    let out = sluice(data.path(), &["man", "--dir", dir.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in ["sluice.1", "sluice-sync.1", "sluice-master-key-rotate.1"] {
        assert!(dir.join(page).exists(), "{page} not written");
    }
    // No files or warehouse are touched by either.
    assert!(!data.path().join("control.sqlite").exists());
}

#[test]
fn quiet_leaves_only_errors_on_stderr_and_no_colour_without_a_terminal() {
    let data = tempfile::tempdir().expect("tmp");
    let file = example("invoices.toml");
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut c = sluice_at(data.path());
        c.args(args).envs(envs.iter().copied());
        c.output().expect("sluice")
    };
    let loud = run(
        &["sync", file.to_str().expect("path")],
        &[("SLUICE_LOG", "info")],
    );
    let stderr = String::from_utf8_lossy(&loud.stderr);
    assert!(stderr.contains("INFO"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour on a pipe: {stderr:?}");
    let quiet = run(
        &["--quiet", "sync", file.to_str().expect("path")],
        &[("SLUICE_LOG", "info")],
    );
    assert!(quiet.status.success());
    assert_eq!(String::from_utf8_lossy(&quiet.stderr), "");
    assert!(String::from_utf8_lossy(&quiet.stdout).contains("succeeded"));
    let failed = run(&["-q", "sync", "no-such.toml"], &[]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("error"));
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), logs are coloured unless
/// NO_COLOR is set.
#[test]
fn no_color_turns_colour_off_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        panic!("util-linux `script` is needed for this test");
    }
    let data = tempfile::tempdir().expect("tmp");
    let on_a_terminal = |no_color: bool| {
        let line = format!(
            "{}SLUICE_LOG=info '{}' --data-dir '{}' sync '{}' --json",
            if no_color { "NO_COLOR=1 " } else { "" },
            env!("CARGO_BIN_EXE_sluice"),
            data.path().display(),
            example("invoices.toml").display()
        );
        let out = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env_remove("SLUICE_DATABASE_URL")
            .env_remove("SLUICE_REDIS_URL")
            .env_remove("NO_COLOR")
            .output()
            .expect("script");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).contains("\u{1b}[")
    };
    assert!(on_a_terminal(false), "coloured on a terminal");
    assert!(!on_a_terminal(true), "NO_COLOR honoured");
}

/// `pipeline init` on files written the way three regions write them, and on a workbook:
/// the mapping, delimiter, date format and separators it proposes load every good row,
/// and its dry run writes nothing.
#[test]
fn pipeline_init_reads_regional_formats_and_its_dry_run_writes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let cases = [
        (
            "us.csv",
            "Invoice ID,Invoice #,Customer,Invoice Date,Due Date,Currency,Total,Amount Due\n\
             1,1001,Acme Inc,12/31/2024,01/30/2025,USD,\"1,234.56\",\"1,234.56\"\n\
             2,1002,Beta LLC,03/02/2024,04/01/2024,USD,99.90,0.00\n\
             3,1003,Gamma Co,03/14/2024,04/13/2024,USD,10.00,20.00\n",
            "%m/%d/%Y",
            None,
            Some(","),
        ),
        (
            "de.csv",
            "ID;Invoice No;Customer;Date;Due;Currency;Total;Balance\n\
             1;R-1;Müller GmbH;31.12.2024;30.01.2025;EUR;1.234,56;1.234,56\n\
             2;R-2;Schmidt AG;02.03.2024;01.04.2024;EUR;99,90;0,00\n\
             3;R-3;Weber KG;14.03.2024;13.04.2024;EUR;10,00;20,00\n",
            "%d.%m.%Y",
            Some(","),
            Some("."),
        ),
        (
            "fr.csv",
            "Reference;Number;Client;Invoice Date;Due Date;Currency;Amount;Amount Due\n\
             1;F-1;Dupont SA;31/12/2024;30/01/2025;EUR;1 234,56;1 234,56\n\
             2;F-2;Martin SARL;02/03/2024;01/04/2024;EUR;99,90;0,00\n\
             3;F-3;Petit SAS;14/03/2024;13/04/2024;EUR;10,00;20,00\n",
            "%d/%m/%Y",
            Some(","),
            Some(" "),
        ),
    ];
    for (file, csv, date_format, decimal, thousands) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, csv).expect("csv");
        let out = sluice(
            &data,
            &[
                "pipeline",
                "init",
                path.to_str().expect("path"),
                "--entity",
                "invoices",
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{file}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let toml = std::fs::read_to_string(path.with_extension("toml")).expect("pipeline file");
        assert!(
            toml.contains(&format!("date_formats = [\"{date_format}\"]")),
            "{file}:\n{toml}"
        );
        match decimal {
            Some(d) => assert!(
                toml.contains(&format!("decimal_separator = \"{d}\"")),
                "{file}:\n{toml}"
            ),
            None => assert!(!toml.contains("decimal_separator"), "{file}:\n{toml}"),
        }
        if let Some(g) = thousands {
            assert!(
                toml.contains(&format!("thousands_separator = \"{g}\"")),
                "{file}:\n{toml}"
            );
        }
        // The dry run: two rows load, the third (balance above total) is quarantined.
        assert!(stdout.contains("would load        2"), "{file}:\n{stdout}");
        assert!(stdout.contains("would quarantine  1"), "{file}:\n{stdout}");
        assert!(stdout.contains("balance_within_total"), "{file}:\n{stdout}");
    }
    assert!(
        !data.join("tenants").exists(),
        "a dry run writes no warehouse"
    );

    // Synced for real, the proposed file loads the amounts exactly.
    let de = dir.path().join("de.toml");
    let run = stdout_json(&sluice(
        &data,
        &["sync", de.to_str().expect("path"), "--json"],
    ));
    assert_eq!(run["inserted"], 2, "{run}");
    let aging = stdout_json(&sluice(
        &data,
        &[
            "finance",
            "ar-aging",
            "--tenant",
            "acme",
            "--as-of",
            "2025-01-01",
            "--json",
        ],
    ));
    assert_eq!(aging["currencies"]["EUR"]["total"], "1234.56", "{aging}");

    // An existing file is not replaced without --force.
    let again = sluice(
        &data,
        &[
            "pipeline",
            "init",
            dir.path().join("de.csv").to_str().expect("path"),
            "--entity",
            "invoices",
        ],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    // A workbook: headers matched, dates already dates.
    let xlsx = dir.path().join("book.xlsx");
    let mut book = rust_xlsxwriter::Workbook::new();
    let sheet = book.add_worksheet();
    for (c, h) in [
        "Invoice ID",
        "Customer",
        "Date",
        "Due Date",
        "Currency",
        "Total",
        "Amount Due",
    ]
    .iter()
    .enumerate()
    {
        sheet.write_string(0, c as u16, *h).expect("header");
    }
    let dates = rust_xlsxwriter::Format::new().set_num_format("dd/mm/yyyy");
    for r in 1..=3u32 {
        sheet.write_string(r, 0, format!("X-{r}")).expect("cell");
        sheet.write_string(r, 1, "Acme").expect("cell");
        let d = rust_xlsxwriter::ExcelDateTime::from_ymd(2024, 3, r as u8).expect("date");
        sheet
            .write_date_with_format(r, 2, &d, &dates)
            .expect("cell");
        let due = rust_xlsxwriter::ExcelDateTime::from_ymd(2024, 4, r as u8).expect("date");
        sheet
            .write_date_with_format(r, 3, &due, &dates)
            .expect("cell");
        sheet.write_string(r, 4, "GBP").expect("cell");
        sheet.write_number(r, 5, 100.5).expect("cell");
        sheet
            .write_number(r, 6, if r == 3 { 200.0 } else { 50.25 })
            .expect("cell");
    }
    book.save(&xlsx).expect("xlsx");
    let out = sluice(
        &data,
        &[
            "pipeline",
            "init",
            xlsx.to_str().expect("path"),
            "--entity",
            "invoices",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("would load        2"), "{stdout}");
    assert!(stdout.contains("would quarantine  1"), "{stdout}");
}

#[test]
fn the_pool_size_is_checked() {
    let data = tempfile::tempdir().expect("tmp");
    let out = sluice(data.path(), &["--db-pool-size", "0", "runs", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("db-pool-size"));
}
