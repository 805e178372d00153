//! Finance reports and quarantine lists exported for spreadsheets, from the CLI
//! (`--format csv|xlsx`) and the API (`Accept: text/csv` or the XLSX media type): the same
//! figures as the JSON, each amount on a row naming its currency, numbers as numbers and
//! dates as dates in the workbook.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;

use calamine::{Data, Reader, Xlsx};
use rust_decimal::Decimal;
use serde_json::Value;
use support::cli::{free_port, sluice, sluice_at};

const XLSX: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A data directory with the example invoices and payments loaded.
fn loaded() -> tempfile::TempDir {
    let data = tempfile::tempdir().expect("tmp");
    for p in ["invoices.toml", "payments.toml"] {
        let out = sluice(data.path(), &["sync", &example(p)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    data
}

const AGING: [&str; 8] = [
    "finance",
    "ar-aging",
    "--tenant",
    "acme",
    "--as-of",
    "2024-06-30",
    "--format",
    "",
];

fn aging(data: &Path, format: &str) -> Output {
    let mut args = AGING;
    args[7] = format;
    let out = sluice(data, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Per currency, the "(all)" row's total of the CSV, as decimals.
fn csv_totals(csv: &[u8]) -> BTreeMap<String, Decimal> {
    let mut reader = csv::Reader::from_reader(csv);
    let headers = reader.headers().expect("headers").clone();
    let at = |name: &str| headers.iter().position(|h| h == name).expect(name);
    let mut totals = BTreeMap::new();
    for record in reader.records() {
        let r = record.expect("record");
        if &r[at("counterparty")] == "(all)" {
            totals.insert(
                r[at("currency")].to_string(),
                r[at("total")].parse().expect("decimal"),
            );
        }
    }
    totals
}

fn json_totals(json: &Value) -> BTreeMap<String, Decimal> {
    json["currencies"]
        .as_object()
        .expect("currencies")
        .iter()
        .map(|(c, a)| {
            (
                c.clone(),
                a["total"]
                    .as_str()
                    .expect("total")
                    .parse()
                    .expect("decimal"),
            )
        })
        .collect()
}

fn workbook(bytes: Vec<u8>) -> calamine::Range<Data> {
    let mut book = Xlsx::new(Cursor::new(bytes)).expect("an XLSX workbook");
    let name = book.sheet_names()[0].clone();
    book.worksheet_range(&name).expect("sheet")
}

/// Every row of a sheet as header -> cell.
fn rows_of(range: &calamine::Range<Data>) -> Vec<BTreeMap<String, Data>> {
    let mut rows = range.rows();
    let header: Vec<String> = rows
        .next()
        .expect("header")
        .iter()
        .map(|c| c.to_string())
        .collect();
    rows.map(|r| header.iter().cloned().zip(r.iter().cloned()).collect())
        .collect()
}

#[test]
fn the_cli_exports_aging_as_csv_and_xlsx_with_the_json_figures() {
    let data = loaded();
    let json: Value = serde_json::from_slice(&aging(data.path(), "json").stdout).expect("json");
    let expected = json_totals(&json);
    assert!(
        expected.len() >= 2,
        "the examples hold several currencies: {json}"
    );

    let csv = aging(data.path(), "csv").stdout;
    assert_eq!(csv_totals(&csv), expected);
    let text = String::from_utf8(csv).expect("utf8");
    assert!(
        text.starts_with(
            "as_of,currency,counterparty_id,counterparty,current,1_30,31_60,61_90,over_90,total\n"
        ),
        "{text}"
    );

    let sheet = rows_of(&workbook(aging(data.path(), "xlsx").stdout));
    let mut totals = BTreeMap::new();
    for row in &sheet {
        // Every amount is a number on a row naming its currency; dates are dates.
        let Data::String(currency) = &row["currency"] else {
            panic!("{row:?}")
        };
        assert!(matches!(row["as_of"], Data::DateTime(_)), "{row:?}");
        assert!(matches!(row["total"], Data::Float(_)), "{row:?}");
        if row["counterparty"] == Data::String("(all)".into()) {
            let Data::Float(total) = row["total"] else {
                unreachable!()
            };
            totals.insert(currency.clone(), total);
        }
    }
    for (currency, total) in &expected {
        let cents = (totals[currency] * 100.0).round() as i64;
        assert_eq!(Decimal::new(cents, 2), total.round_dp(2), "{currency}");
    }

    // The other reports export too.
    let period = [
        "--tenant",
        "acme",
        "--from",
        "2024-01-01",
        "--to",
        "2024-12-31",
    ];
    let csv = ["--format", "csv"];
    for args in [
        [&["finance", "cash-flow"][..], &period, &csv].concat(),
        [&["finance", "profitability"][..], &period, &csv].concat(),
        [&["finance", "anomalies", "--tenant", "acme"][..], &csv].concat(),
        [&["quarantine", "list", "--tenant", "acme"][..], &csv].concat(),
    ] {
        let out = sluice(data.path(), &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut reader = csv::Reader::from_reader(out.stdout.as_slice());
        assert!(reader.headers().expect("headers").len() >= 5, "{args:?}");
    }
    let quarantine = sluice(
        data.path(),
        &["quarantine", "list", "--tenant", "acme", "--format", "csv"],
    );
    let listed = csv::Reader::from_reader(quarantine.stdout.as_slice())
        .records()
        .count();
    let json = sluice(
        data.path(),
        &["quarantine", "list", "--tenant", "acme", "--json"],
    );
    let rows: Vec<Value> = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(listed, rows.len());
    assert!(listed > 0, "the examples quarantine some rows");
    assert!(
        sluice(
            data.path(),
            &[
                "finance",
                "cash-flow",
                "--tenant",
                "acme",
                "--from",
                "2024-01-01",
                "--to",
                "2024-12-31",
                "--format",
                "xlsx",
                "--json"
            ]
        )
        .status
        .code()
            == Some(2)
    );
}

#[test]
fn the_api_answers_csv_and_xlsx_when_asked() {
    let data = loaded();
    let port = free_port();
    let key = sluice(
        data.path(),
        &["key", "create", "--tenant", "acme", "--role", "analyst"],
    );
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
    let key = String::from_utf8_lossy(&key.stdout).trim().to_string();
    let serve = sluice_at(data.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _serve = Kill(serve);
    let get = |path: &str, accept: &str| -> (u16, String, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "-D",
                    "-",
                    "-H",
                    &format!("authorization: Bearer {key}"),
                    "-H",
                    &format!("accept: {accept}"),
                ])
                .arg(format!("http://127.0.0.1:{port}{path}"))
                .output()
                .expect("curl");
            if out.status.success() {
                let split = out
                    .stdout
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("head");
                let head = String::from_utf8_lossy(&out.stdout[..split]).to_string();
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return (
                    status,
                    head.to_ascii_lowercase(),
                    out.stdout[split + 4..].to_vec(),
                );
            }
            assert!(Instant::now() < deadline, "serve did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let path = "/v1/finance/ar-aging?as_of=2024-06-30";
    let (status, _, body) = get(path, "application/json");
    assert_eq!(status, 200);
    let expected = json_totals(&serde_json::from_slice(&body).expect("json"));
    let (status, head, body) = get(path, "text/csv");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: text/csv"), "{head}");
    assert!(
        head.contains("attachment; filename=\"ar-aging-2024-06-30.csv\""),
        "{head}"
    );
    assert_eq!(csv_totals(&body), expected);
    let (status, head, body) = get(path, XLSX);
    assert_eq!(status, 200);
    assert!(head.contains(XLSX), "{head}");
    assert!(!rows_of(&workbook(body)).is_empty());

    // The quarantine list: every matching row, not a page.
    let (_, _, body) = get("/v1/quarantine?limit=1", "application/json");
    let page: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    let (status, _, body) = get("/v1/quarantine?limit=1", "text/csv");
    assert_eq!(status, 200);
    let all = csv::Reader::from_reader(body.as_slice()).records().count();
    let json = sluice(
        data.path(),
        &["quarantine", "list", "--tenant", "acme", "--json"],
    );
    let rows: Vec<Value> = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(all, rows.len());
    assert!(all > 1);
}
