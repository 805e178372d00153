//! End-to-end behaviour of `run_pipeline` on the embedded warehouse: exact accounting on a
//! messy file, idempotent re-runs, resuming after a failure, and aging figures.

mod support;

use sluice_engine::prelude::*;
use std::collections::HashMap;
use std::path::Path;

use chrono::NaiveDate;
use rust_decimal::Decimal;
use sluice_engine::finance_rules::AgingSide;
use sluice_engine::quarantine::QuarantineFilter;
use sluice_engine::warehouse::memory::{MemoryFaults, MemoryWarehouse};
use sluice_engine::{Entity, RunStatus, SqliteWarehouse, TenantSlug};
use sluice_pipelines::{PipelineSource, PipelineSpec, Quiet, RunOptions, run_pipeline};
use support::{expected_aging, messy_invoices, report_buckets};

fn write_pipeline(dir: &Path, csv: &str, batch_rows: usize) -> PipelineSpec {
    std::fs::write(dir.join("invoices.csv"), csv).expect("write csv");
    let toml = format!(
        "name = \"gen-invoices\"\ntenant = \"acme\"\nentity = \"invoices\"\nbatch_rows = {batch_rows}\n[source]\nkind = \"csv\"\npath = \"invoices.csv\"\n"
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, toml).expect("write toml");
    PipelineSpec::from_file(&path).expect("valid pipeline")
}

fn tenant() -> TenantSlug {
    TenantSlug::parse("acme").expect("slug")
}

async fn totals_by_currency(w: &SqliteWarehouse) -> (usize, HashMap<String, Decimal>) {
    let invoices = w.invoices(&tenant()).await.expect("invoices");
    let mut sums = HashMap::new();
    for i in &invoices {
        *sums.entry(i.currency.clone()).or_insert(Decimal::ZERO) += i.total;
    }
    (invoices.len(), sums)
}

fn expected_sums(exp: &support::Expected) -> HashMap<String, Decimal> {
    exp.sum_of_totals()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[tokio::test]
async fn messy_file_accounting_matches_the_generator_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (csv, exp) = messy_invoices(20_000, 7);
    let spec = write_pipeline(dir.path(), &csv, 1000);
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");

    let report = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("run");
    let c = report.ledger.counts;
    assert_eq!(report.ledger.status, RunStatus::Succeeded);
    assert_eq!(c.rows_read, exp.rows_read);
    assert_eq!(
        c.inserted, exp.loaded,
        "every distinct good id inserted once"
    );
    assert_eq!((c.updated, c.unchanged), (0, 0));
    assert_eq!(c.quarantined, exp.quarantined);
    assert_eq!(c.deduplicated, exp.deduplicated);
    assert_eq!(c.rows_read, c.loaded() + c.quarantined + c.deduplicated);

    let quarantined = w
        .quarantined(
            &tenant(),
            &QuarantineFilter {
                run_id: Some(report.ledger.run_id.clone()),
                limit: Some(100_000),
                ..Default::default()
            },
        )
        .await
        .expect("quarantine");
    assert_eq!(quarantined.len() as u64, exp.quarantined);
    let with_rule = |rule: &str| {
        quarantined
            .iter()
            .filter(|q| q.errors.iter().any(|e| e.rule == rule))
            .count() as u64
    };
    let k = |kind: &str| exp.bad_by_kind.get(kind).copied().unwrap_or(0);
    assert_eq!(with_rule("required"), k("missing_id"));
    assert_eq!(with_rule("currency_code"), k("bad_currency"));
    assert_eq!(with_rule("date_format"), k("bad_date"));
    assert_eq!(with_rule("total_non_negative"), k("negative_total"));
    // A negative total also leaves its balance outside [0, total].
    assert_eq!(
        with_rule("balance_within_total"),
        k("balance_over_total") + k("negative_total")
    );
    assert_eq!(with_rule("due_not_before_issue"), k("due_before_issue"));
    assert_eq!(with_rule("decimal_format"), k("bad_amount"));
    assert_eq!(with_rule("ragged_row"), k("ragged"));
    assert!(
        BAD_KINDS_ALL_PLANTED(&exp),
        "the generator planted every kind of bad row"
    );
    // Every quarantined row keeps its raw values and the CSV line it came from.
    assert!(
        quarantined
            .iter()
            .all(|q| q.position.row >= 2 && !q.raw.is_empty())
    );

    let (count, sums) = totals_by_currency(&w).await;
    assert_eq!(count as u64, exp.loaded);
    assert_eq!(sums, expected_sums(&exp));
    // The winning version of every duplicated id is the one stored.
    let stored = w.invoices(&tenant()).await.expect("invoices");
    for inv in &stored {
        let want = &exp.winners[&inv.external_id];
        assert_eq!(
            inv.balance,
            Decimal::new(want.balance_cents, 2),
            "{}",
            inv.external_id
        );
        assert_eq!(inv.status, want.status);
    }
}

#[allow(non_snake_case)]
fn BAD_KINDS_ALL_PLANTED(exp: &support::Expected) -> bool {
    support::BAD_KINDS
        .iter()
        .all(|k| exp.bad_by_kind.get(k).copied().unwrap_or(0) > 0)
}

#[tokio::test]
async fn rerunning_the_same_file_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (csv, exp) = messy_invoices(5_000, 11);
    let spec = write_pipeline(dir.path(), &csv, 700);
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("first run");
    let before = totals_by_currency(&w).await;

    let again = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("second run");
    let c = again.ledger.counts;
    assert_eq!((c.inserted, c.updated), (0, 0));
    assert_eq!(c.unchanged, exp.loaded);
    assert_eq!(c.quarantined, exp.quarantined);
    assert_eq!(c.deduplicated, exp.deduplicated);
    assert_eq!(totals_by_currency(&w).await, before);
    // The same bad rows read again do not pile up in quarantine.
    let all = w
        .quarantined(
            &tenant(),
            &QuarantineFilter {
                limit: Some(100_000),
                ..Default::default()
            },
        )
        .await
        .expect("q");
    assert_eq!(all.len() as u64, exp.quarantined);
}

#[tokio::test]
async fn a_newer_version_in_a_later_file_updates_and_an_older_one_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let header = "external_id,issue_date,due_date,currency,total,balance,updated_at\n";
    let spec = write_pipeline(
        dir.path(),
        &format!(
            "{header}A,2024-01-01,2024-01-31,USD,100.00,100.00,2024-02-01T00:00:00Z\nB,2024-01-01,2024-01-31,USD,50.00,50.00,2024-02-01T00:00:00Z\n"
        ),
        10,
    );
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
    // A paid in full (newer); B with an older version that must not win.
    std::fs::write(
        dir.path().join("invoices.csv"),
        format!("{header}A,2024-01-01,2024-01-31,USD,100.00,0.00,2024-03-01T00:00:00Z\nB,2024-01-01,2024-01-31,USD,50.00,0.00,2024-01-15T00:00:00Z\n"),
    )
    .expect("rewrite");
    let r = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("second");
    assert_eq!((r.ledger.counts.updated, r.ledger.counts.unchanged), (1, 1));
    let stored = w.invoices(&tenant()).await.expect("invoices");
    let bal: HashMap<_, _> = stored
        .iter()
        .map(|i| (i.external_id.as_str(), i.balance))
        .collect();
    assert_eq!(bal["A"], Decimal::ZERO);
    assert_eq!(bal["B"], Decimal::new(5000, 2));
    assert_eq!(
        stored
            .iter()
            .find(|i| i.external_id == "A")
            .map(|i| i.status.as_str()),
        Some("paid")
    );
}

#[tokio::test]
async fn failure_after_batch_k_resumes_without_duplicates_or_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (csv, exp) = messy_invoices(12_000, 23);
    let spec = write_pipeline(dir.path(), &csv, 1000);
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");

    // The store fails on the 4th batch commit, as a crash between two batches would.
    let w = MemoryWarehouse::with_faults(MemoryFaults {
        fail_commit: Some(4),
    });
    let err = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect_err("batch 4 fails");
    assert!(
        err.is_transient(),
        "an unavailable warehouse is worth retrying: {err}"
    );
    let failed_run = err.run_id().expect("run id").to_string();
    let ledger = w
        .run(&tenant(), &failed_run)
        .await
        .expect("ledger")
        .expect("run recorded");
    assert_eq!(ledger.status, RunStatus::Failed);
    assert_eq!(
        ledger.counts.rows_read, 3000,
        "three batches committed before the failure"
    );
    assert!(
        ledger
            .error
            .as_deref()
            .unwrap_or("")
            .contains("injected failure")
    );

    let resumed = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("rerun");
    let c = resumed.ledger.counts;
    assert_eq!(
        c.rows_read,
        exp.rows_read - 3000,
        "the rerun starts after the last committed batch"
    );
    assert_eq!(
        ledger.counts.rows_read + c.rows_read,
        exp.rows_read,
        "no record read twice or skipped"
    );
    let invoices = w.live_rows(&tenant(), Entity::Invoices);
    let mut sums = HashMap::new();
    for i in &invoices {
        *sums
            .entry(i.text("currency").expect("currency").to_string())
            .or_insert(Decimal::ZERO) += i.amount("total").expect("total");
    }
    assert_eq!(invoices.len() as u64, exp.loaded);
    assert_eq!(sums, expected_sums(&exp));
    assert_eq!(w.quarantined(&tenant()).len() as u64, exp.quarantined);

    // Once complete, the next run reads the whole file again and finds nothing new.
    let third = run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("third");
    assert_eq!(third.ledger.counts.rows_read, exp.rows_read);
    assert_eq!(
        third.ledger.counts.inserted + third.ledger.counts.updated,
        0
    );
}

#[tokio::test]
async fn ar_aging_matches_an_independent_computation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (csv, exp) = messy_invoices(8_000, 99);
    let spec = write_pipeline(dir.path(), &csv, 2048);
    let w = SqliteWarehouse::new(dir.path().join("data"));
    let source = PipelineSource::from_spec(
        &spec.source,
        None,
        &sluice_pipelines::SourceReach::unrestricted(),
    )
    .expect("source");
    run_pipeline(&spec, &source, &w, &RunOptions::default(), &Quiet)
        .await
        .expect("run");
    for as_of in ["2024-01-15", "2024-03-31", "2024-06-30", "2024-12-31"] {
        let as_of: NaiveDate = as_of.parse().expect("date");
        let report = w
            .aging(&tenant(), AgingSide::Receivable, as_of)
            .await
            .expect("aging");
        let want: HashMap<String, [Decimal; 5]> = expected_aging(&exp, as_of)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(report_buckets(&report), want, "as of {as_of}");
    }
}

#[tokio::test]
async fn aging_buckets_respect_the_boundary_days_void_and_credit_notes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // As of 2024-06-30: due on the day -> current; 30 days -> 1_30; 31 -> 31_60; 60 -> 31_60;
    // 61 -> 61_90; 90 -> 61_90; 91 -> over_90. Void and paid rows never count.
    let rows = [
        ("D0", "2024-06-30", "10.00", "invoice", "open"),
        ("D30", "2024-05-31", "1.00", "invoice", "open"),
        ("D31", "2024-05-30", "2.00", "invoice", "open"),
        ("D60", "2024-05-01", "4.00", "invoice", "open"),
        ("D61", "2024-04-30", "8.00", "invoice", "open"),
        ("D90", "2024-04-01", "16.00", "invoice", "open"),
        ("D91", "2024-03-31", "32.00", "invoice", "open"),
        ("VOID", "2024-03-31", "64.00", "invoice", "void"),
        ("CN", "2024-05-31", "0.50", "credit_note", "open"),
        ("EURO", "2024-07-31", "7.00", "invoice", "open"),
    ];
    let mut csv =
        String::from("external_id,issue_date,due_date,currency,total,balance,kind,status\n");
    for (id, due, bal, kind, status) in rows {
        let cur = if id == "EURO" { "EUR" } else { "USD" };
        csv.push_str(&format!(
            "{id},2024-01-01,{due},{cur},100.00,{bal},{kind},{status}\n"
        ));
    }
    let spec = write_pipeline(dir.path(), &csv, 100);
    let w = SqliteWarehouse::new(dir.path().join("data"));
    run_pipeline(
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
    .expect("run");
    let r = w
        .aging(
            &tenant(),
            AgingSide::Receivable,
            "2024-06-30".parse().expect("date"),
        )
        .await
        .expect("aging");
    let d = |s: &str| s.parse::<Decimal>().expect("decimal");
    let usd = report_buckets(&r)["USD"];
    assert_eq!(
        usd,
        [d("10.00"), d("0.50"), d("6.00"), d("24.00"), d("32.00")]
    );
    assert_eq!(
        report_buckets(&r)["EUR"],
        [d("7.00"), d("0"), d("0"), d("0"), d("0")]
    );
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(json["currencies"]["USD"]["1_30"], "0.50");
    assert_eq!(json["as_of"], "2024-06-30");
}

async fn sync_csv(
    dir: &Path,
    entity: &str,
    csv: &str,
) -> (
    sluice_engine::RunLedger,
    SqliteWarehouse,
    Vec<sluice_engine::quarantine::QuarantinedRow>,
) {
    std::fs::write(dir.join(format!("{entity}.csv")), csv).expect("write");
    let path = dir.join(format!("{entity}.toml"));
    std::fs::write(&path, format!("name = \"{entity}\"\ntenant = \"acme\"\nentity = \"{entity}\"\n[source]\nkind = \"csv\"\npath = \"{entity}.csv\"\n")).expect("toml");
    let spec = PipelineSpec::from_file(&path).expect("spec");
    let w = SqliteWarehouse::new(dir.join("data"));
    let report = run_pipeline(
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
    .expect("run");
    let q = w
        .quarantined(
            &tenant(),
            &QuarantineFilter {
                run_id: Some(report.ledger.run_id.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("quarantine");
    (report.ledger, w, q)
}

fn rules_of(q: &[sluice_engine::quarantine::QuarantinedRow]) -> Vec<String> {
    let mut r: Vec<String> = q
        .iter()
        .flat_map(|r| r.errors.iter().map(|e| format!("{}:{}", e.field, e.rule)))
        .collect();
    r.sort();
    r
}

#[tokio::test]
async fn payments_need_a_positive_amount_a_direction_and_a_date() {
    let dir = tempfile::tempdir().expect("tmp");
    let csv = "external_id,direction,counterparty_id,date,amount,currency,applied_to\n\
               P1,in,C-1,2024-05-01,100.00,USD,\n\
               P2,out,V-1,2024-05-02,-5.00,USD,B-1\n\
               P3,sideways,C-1,2024-05-03,5.00,USD,\n\
               P4,in,C-2,,5.00,EUR,\n\
               P5,In,C-2,2024-05-04,250.10,EUR,INV-1; INV-2\n";
    let (ledger, w, q) = sync_csv(dir.path(), "payments", csv).await;
    assert_eq!(
        (
            ledger.counts.rows_read,
            ledger.counts.inserted,
            ledger.counts.quarantined
        ),
        (5, 2, 3)
    );
    assert_eq!(
        rules_of(&q),
        [
            "amount:amount_positive",
            "date:required",
            "direction:allowed_values"
        ]
    );
    let payments = w.payments(&tenant()).await.expect("payments");
    let p5 = payments
        .iter()
        .find(|p| p.external_id == "P5")
        .expect("P5 loaded");
    assert_eq!(p5.applied_to, ["INV-1", "INV-2"]);
    assert_eq!(p5.direction, "in");
    assert_eq!(p5.amount, "250.10".parse::<Decimal>().expect("dec"));
}

#[tokio::test]
async fn customers_and_accounts_are_checked_by_their_own_rules() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ledger, _, q) = sync_csv(
        dir.path(),
        "customers",
        "external_id,name,email,currency,active\nC1,Northwind,ap@northwind.example,USD,yes\nC2,,x@y.example,USD,true\nC3,Contoso,,usd,maybe\nC4,Fabrikam,,XXX,\n",
    )
    .await;
    assert_eq!((ledger.counts.inserted, ledger.counts.quarantined), (1, 3));
    assert_eq!(
        rules_of(&q),
        [
            "active:boolean_format",
            "currency:currency_code",
            "name:required"
        ]
    );

    let (ledger, _, q) = sync_csv(
        dir.path(),
        "accounts",
        "external_id,code,name,type\nA1,4000,Sales,income\nA2,5000,COGS,Cogs\nA3,4100,Services,revenue\n",
    )
    .await;
    assert_eq!((ledger.counts.inserted, ledger.counts.quarantined), (2, 1));
    assert_eq!(rules_of(&q), ["type:allowed_values"]);
}
