//! Finance reports and quarantine lists as tables for spreadsheets: CSV, and XLSX workbooks
//! whose amounts are numbers (formatted with their currency code) and whose dates and
//! months are dates. Every amount sits on a row that names its currency, so amounts of two
//! currencies never share a column without their code; totals are per currency.

use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sluice_engine::finance_rules::AGING_BUCKETS;
use sluice_engine::quarantine::QuarantinedRow;
use sluice_finance::{AgingDetail, Anomaly, CashFlowReport, ProfitabilityReport};

/// The media type of an XLSX workbook.
pub const XLSX: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Text.
    Text(String),
    /// An amount of the row's currency (ISO 4217 code).
    Money(Decimal, String),
    /// A plain number (a ratio, a count).
    Number(Decimal),
    /// A day.
    Date(NaiveDate),
    /// A month (written as its first day, shown as `yyyy-mm`).
    Month(NaiveDate),
    /// Nothing.
    Empty,
}

/// A table: a sheet name, column headers and rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The worksheet's name.
    pub sheet: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub rows: Vec<Vec<Cell>>,
}

fn text(s: impl Into<String>) -> Cell {
    Cell::Text(s.into())
}

fn month(m: &str) -> Cell {
    NaiveDate::parse_from_str(&format!("{m}-01"), "%Y-%m-%d").map_or_else(|_| text(m), Cell::Month)
}

fn columns(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// AR or AP aging: a row per counterparty and currency, then the currency's total row.
pub fn aging_table(report: &AgingDetail, title: &str) -> Table {
    let mut cols = vec!["as_of", "currency", "counterparty_id", "counterparty"];
    cols.extend(AGING_BUCKETS);
    cols.push("total");
    let mut rows = Vec::new();
    for (currency, a) in &report.currencies {
        let money = |d: Decimal| Cell::Money(d, currency.clone());
        let line = |id: Cell, name: Cell, b: &sluice_engine::finance_rules::AgingBuckets, total| {
            let mut row = vec![Cell::Date(report.as_of), text(currency), id, name];
            row.extend([b.current, b.d1_30, b.d31_60, b.d61_90, b.over_90].map(money));
            row.push(money(total));
            row
        };
        for c in &a.counterparties {
            let id = c.id.clone().map_or(Cell::Empty, Cell::Text);
            let name = c.name.clone().map_or(Cell::Empty, Cell::Text);
            rows.push(line(id, name, &c.buckets, c.total));
        }
        rows.push(line(Cell::Empty, text("(all)"), &a.buckets, a.total));
    }
    Table {
        sheet: title.to_string(),
        columns: columns(&cols),
        rows,
    }
}

/// Cash flow: a row per currency and month, then the currency's period total.
pub fn cash_flow_table(report: &CashFlowReport) -> Table {
    let mut rows = Vec::new();
    for (currency, flow) in &report.currencies {
        let money = |d: Decimal| Cell::Money(d, currency.clone());
        for m in &flow.monthly {
            rows.push(vec![
                text(currency),
                month(&m.month),
                money(m.flow.inflow),
                money(m.flow.outflow),
                money(m.flow.net),
            ]);
        }
        rows.push(vec![
            text(currency),
            text("total"),
            money(flow.total.inflow),
            money(flow.total.outflow),
            money(flow.total.net),
        ]);
    }
    Table {
        sheet: "Cash flow".into(),
        columns: columns(&["currency", "month", "inflow", "outflow", "net"]),
        rows,
    }
}

/// Profitability: a row per currency and month, then the currency's period total.
pub fn profitability_table(report: &ProfitabilityReport) -> Table {
    let mut rows = Vec::new();
    for (currency, p) in &report.currencies {
        let money = |d: Decimal| Cell::Money(d, currency.clone());
        let line = |label: Cell, x: &sluice_finance::Profit| {
            vec![
                text(currency),
                label,
                money(x.revenue),
                money(x.cogs),
                money(x.gross_profit),
                x.gross_margin.map_or(Cell::Empty, Cell::Number),
                money(x.expenses),
                money(x.net_profit),
            ]
        };
        for m in &p.monthly {
            rows.push(line(month(&m.month), &m.profit));
        }
        rows.push(line(text("total"), &p.total));
    }
    Table {
        sheet: "Profitability".into(),
        columns: columns(&[
            "currency",
            "month",
            "revenue",
            "cogs",
            "gross_profit",
            "gross_margin",
            "expenses",
            "net_profit",
        ]),
        rows,
    }
}

/// Anomalies, one per row.
pub fn anomalies_table(found: &[Anomaly]) -> Table {
    Table {
        sheet: "Anomalies".into(),
        columns: columns(&[
            "kind",
            "side",
            "document",
            "currency",
            "counterparty_id",
            "amount",
            "why",
        ]),
        rows: found
            .iter()
            .map(|a| {
                vec![
                    text(&a.kind),
                    text(&a.side),
                    text(&a.document),
                    text(&a.currency),
                    a.counterparty_id.clone().map_or(Cell::Empty, Cell::Text),
                    Cell::Money(a.amount, a.currency.clone()),
                    text(&a.why),
                ]
            })
            .collect(),
    }
}

/// Quarantined rows: where each came from, why it was set aside, and its raw values.
pub fn quarantine_table(rows: &[QuarantinedRow]) -> Table {
    Table {
        sheet: "Quarantine".into(),
        columns: columns(&[
            "id",
            "pipeline",
            "run_id",
            "entity",
            "status",
            "location",
            "sheet",
            "row",
            "rules",
            "fields",
            "errors",
            "raw",
            "quarantined_at",
        ]),
        rows: rows
            .iter()
            .map(|r| {
                let join = |f: &dyn Fn(&sluice_engine::validate::CellError) -> String| {
                    r.errors.iter().map(f).collect::<Vec<_>>().join("; ")
                };
                vec![
                    text(&r.id),
                    text(&r.pipeline),
                    text(&r.run_id),
                    text(&r.entity),
                    text(r.status.as_str()),
                    text(&r.position.location),
                    r.position.sheet.clone().map_or(Cell::Empty, Cell::Text),
                    Cell::Number(Decimal::from(r.position.row)),
                    text(join(&|e| e.rule.clone())),
                    text(join(&|e| e.field.clone())),
                    text(join(&|e| format!("{}: {}", e.field, e.message))),
                    text(serde_json::Value::Object(r.raw.clone()).to_string()),
                    Cell::Date(r.created_at.date_naive()),
                ]
            })
            .collect(),
    }
}

/// The table as CSV (RFC 4180; amounts as exact decimals, dates ISO 8601, months
/// `YYYY-MM`).
pub fn to_csv(table: &Table) -> Vec<u8> {
    let mut out = csv::Writer::from_writer(Vec::new());
    // Writing records into memory cannot fail.
    let _ = out.write_record(&table.columns);
    for row in &table.rows {
        let _ = out.write_record(row.iter().map(|c| match c {
            Cell::Text(s) => s.clone(),
            Cell::Money(d, _) | Cell::Number(d) => d.to_string(),
            Cell::Date(d) => d.to_string(),
            Cell::Month(d) => d.format("%Y-%m").to_string(),
            Cell::Empty => String::new(),
        }));
    }
    out.into_inner().unwrap_or_default()
}

/// The table as an XLSX workbook of one sheet: amounts are numbers formatted with their
/// currency code, dates and months are dates; the header row is bold and frozen.
pub fn to_xlsx(table: &Table) -> Result<Vec<u8>, rust_xlsxwriter::XlsxError> {
    use rust_xlsxwriter::{ExcelDateTime, Format, Workbook};
    let mut book = Workbook::new();
    let sheet = book.add_worksheet();
    sheet.set_name(sheet_name(&table.sheet))?;
    let bold = Format::new().set_bold();
    let day = Format::new().set_num_format("yyyy-mm-dd");
    let month_format = Format::new().set_num_format("yyyy-mm");
    let mut money_formats: std::collections::HashMap<String, Format> = Default::default();
    for (c, name) in table.columns.iter().enumerate() {
        sheet.write_string_with_format(0, col(c), name, &bold)?;
    }
    for (r, row) in table.rows.iter().enumerate() {
        let r = u32::try_from(r + 1).unwrap_or(u32::MAX);
        for (c, cell) in row.iter().enumerate() {
            let c = col(c);
            let date = |d: &NaiveDate| {
                ExcelDateTime::from_ymd(d.year() as u16, d.month() as u8, d.day() as u8)
            };
            match cell {
                Cell::Text(s) => {
                    sheet.write_string(r, c, s)?;
                }
                Cell::Money(d, currency) => {
                    let format = money_formats.entry(currency.clone()).or_insert_with(|| {
                        // The code in the format: the number stays a number.
                        let code: String = currency
                            .chars()
                            .filter(char::is_ascii_alphanumeric)
                            .collect();
                        Format::new().set_num_format(format!("#,##0.00 \"{code}\""))
                    });
                    sheet.write_number_with_format(r, c, d.to_f64().unwrap_or(f64::NAN), format)?;
                }
                Cell::Number(d) => {
                    sheet.write_number(r, c, d.to_f64().unwrap_or(f64::NAN))?;
                }
                Cell::Date(d) => {
                    sheet.write_date_with_format(r, c, date(d)?, &day)?;
                }
                Cell::Month(d) => {
                    sheet.write_date_with_format(r, c, date(d)?, &month_format)?;
                }
                Cell::Empty => {}
            }
        }
    }
    if !table.rows.is_empty() {
        sheet.set_freeze_panes(1, 0)?;
        sheet.autofit();
    }
    book.save_to_buffer()
}

fn col(c: usize) -> u16 {
    u16::try_from(c).unwrap_or(u16::MAX)
}

/// A worksheet name Excel accepts: at most 31 characters, none of `[]:*?/\`.
fn sheet_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| !"[]:*?/\\".contains(*c))
        .take(31)
        .collect();
    if clean.is_empty() {
        "Sheet1".into()
    } else {
        clean
    }
}

/// The export formats, as the CLI and the API name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON (the report's own shape).
    Json,
    /// CSV.
    Csv,
    /// An XLSX workbook.
    Xlsx,
}

impl Format {
    /// The format an `Accept` header asks for: CSV or XLSX by media type, else JSON.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let accept = accept.unwrap_or_default().to_ascii_lowercase();
        let asks = |media: &str| {
            accept
                .split(',')
                .any(|part| part.split(';').next().is_some_and(|m| m.trim() == media))
        };
        if asks("text/csv") {
            Format::Csv
        } else if asks(XLSX) {
            Format::Xlsx
        } else {
            Format::Json
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_choose_the_format() {
        assert_eq!(Format::from_accept(Some("text/csv")), Format::Csv);
        assert_eq!(
            Format::from_accept(Some("application/json;q=0.5, text/csv;q=0.9")),
            Format::Csv
        );
        assert_eq!(Format::from_accept(Some(XLSX)), Format::Xlsx);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Json);
        assert_eq!(Format::from_accept(None), Format::Json);
    }

    #[test]
    fn csv_keeps_exact_decimals_and_quotes_what_needs_it() {
        let t = Table {
            sheet: "x".into(),
            columns: columns(&["currency", "month", "amount", "why"]),
            rows: vec![vec![
                text("EUR"),
                month("2024-03"),
                Cell::Money(Decimal::new(123456789, 2), "EUR".into()),
                text("a, \"b\""),
            ]],
        };
        let csv = String::from_utf8(to_csv(&t)).expect("utf8");
        assert_eq!(
            csv,
            "currency,month,amount,why\nEUR,2024-03,1234567.89,\"a, \"\"b\"\"\"\n"
        );
        assert!(to_xlsx(&t).expect("xlsx").starts_with(b"PK"));
    }
}
