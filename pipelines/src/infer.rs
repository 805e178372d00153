//! Proposing a pipeline from a sample of a file: which column holds which canonical field
//! (by name, then by the synonyms spreadsheets use: "Invoice #", "Amount Due",
//! "Customer"), the CSV delimiter, the date format (31/12/2024 against 12/31/2024, decided
//! by the values) and the decimal and thousands separators. `sluice pipeline init` writes
//! what this proposes as a commented pipeline file.

use sluice_engine::entity::{Absent, Entity, FieldKind};

/// What the sample suggests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// Canonical field -> the column chosen for it, in the entity's field order.
    pub mapping: Vec<(String, String)>,
    /// Columns no field took.
    pub unmapped: Vec<String>,
    /// Required fields no column matched (and that have no default).
    pub missing: Vec<String>,
    /// The strftime date format the date columns' values all parse with, when not ISO.
    pub date_format: Option<String>,
    /// Set when the date values fit day-first and month-first alike (every day <= 12).
    pub date_ambiguous: bool,
    /// `","` when amounts are written with a decimal comma.
    pub decimal_separator: Option<String>,
    /// The digit-group separator seen in amounts (`"."`, `","`, `" "`, `"'"`), when any.
    pub thousands_separator: Option<String>,
}

/// The column names and up to `limit` records of a file source's first batch, as text.
pub async fn sample<S: sluice_connectors::Source>(
    source: &S,
    limit: usize,
) -> Result<(Vec<String>, Vec<Vec<String>>), crate::PipelineError> {
    use arrow_array::{Array, StringArray};
    use futures_util::StreamExt;
    let stream = source
        .streams()
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| crate::PipelineError::config("the source offers no stream to read"))?;
    let headers: Vec<String> = stream
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut batches = source
        .read(sluice_connectors::ReadRequest {
            stream: stream.name.clone(),
            from: None,
            batch_rows: limit.max(1),
        })
        .await?;
    let mut rows = Vec::new();
    if let Some(batch) = batches.next().await {
        let records = batch?.records;
        let columns: Vec<Option<&StringArray>> = records
            .columns()
            .iter()
            .map(|c| c.as_any().downcast_ref::<StringArray>())
            .collect();
        for r in 0..records.num_rows().min(limit) {
            rows.push(
                columns
                    .iter()
                    .map(|c| match c {
                        Some(a) if a.is_valid(r) => a.value(r).to_string(),
                        _ => String::new(),
                    })
                    .collect(),
            );
        }
    }
    Ok((headers, rows))
}

/// Lower case, letters and digits only: "Invoice #" -> "invoice", "Amount Due" -> "amountdue".
fn norm(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .flat_map(char::to_lowercase)
        .collect()
}

/// Names a column may carry for `field`, best first (after the field's own name).
fn synonyms(entity: Entity, field: &str) -> &'static [&'static str] {
    match (entity, field) {
        (Entity::Invoices | Entity::Bills, "external_id") => &[
            "id",
            "invoiceid",
            "billid",
            "documentid",
            "docid",
            "txnid",
            "transactionid",
            "reference",
            "ref",
        ],
        (Entity::Invoices | Entity::Bills, "doc_number") => &[
            "invoice",
            "invoiceno",
            "invoicenumber",
            "invoicenum",
            "bill",
            "billno",
            "billnumber",
            "number",
            "no",
            "docno",
            "documentnumber",
        ],
        (Entity::Payments, "external_id") => &[
            "id",
            "paymentid",
            "txnid",
            "transactionid",
            "reference",
            "ref",
        ],
        (_, "external_id") => &["id", "code", "number", "ref"],
        (_, "customer_id") => &[
            "customerref",
            "customerno",
            "customercode",
            "clientid",
            "clientref",
            "accountid",
        ],
        (_, "customer_name") => &["customer", "client", "clientname", "billto", "soldto"],
        (_, "vendor_id") => &[
            "vendorref",
            "vendorno",
            "vendorcode",
            "supplierid",
            "supplierref",
        ],
        (_, "vendor_name") => &["vendor", "supplier", "suppliername", "payee"],
        (_, "counterparty_id") => &[
            "customerid",
            "vendorid",
            "partyid",
            "counterparty",
            "customer",
            "vendor",
        ],
        (_, "issue_date") => &[
            "date",
            "invoicedate",
            "billdate",
            "issued",
            "txndate",
            "documentdate",
            "docdate",
        ],
        (_, "due_date") => &["due", "duedate", "paymentdue", "dueon"],
        (_, "date") => &["paymentdate", "paidon", "paiddate", "txndate", "valuedate"],
        (_, "currency") => &["curr", "ccy", "currencycode", "cur"],
        (_, "total") => &[
            "amount",
            "invoicetotal",
            "grandtotal",
            "totalamount",
            "gross",
            "total",
        ],
        (_, "balance") => &[
            "amountdue",
            "balancedue",
            "openbalance",
            "outstanding",
            "openamount",
            "due",
        ],
        (_, "amount") => &["paid", "amountpaid", "paymentamount", "total"],
        (_, "updated_at") => &[
            "lastmodified",
            "modified",
            "updated",
            "lastupdated",
            "modifiedat",
        ],
        (_, "applied_to") => &["invoices", "appliedto", "applies", "documents"],
        (_, "direction") => &["type", "inout"],
        (_, "kind") => &["type", "doctype", "documenttype"],
        _ => &[],
    }
}

const DATE_FORMATS: [&str; 7] = [
    "%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%m-%Y", "%m-%d-%Y", "%Y/%m/%d",
];

/// Proposes a mapping for `entity` from `headers` and sample `rows` (cells as text).
pub fn propose(entity: Entity, headers: &[String], rows: &[Vec<String>]) -> Proposal {
    let normalised: Vec<String> = headers.iter().map(|h| norm(h)).collect();
    let mut taken = vec![false; headers.len()];
    let mut chosen: Vec<(&'static str, usize)> = Vec::new();
    // Two passes: every field's own name first, so "total" is not taken as an amount
    // synonym before the column called Total is seen; then synonyms in order.
    for pass in 0..2 {
        for field in entity.fields() {
            if chosen.iter().any(|(f, _)| *f == field.name) {
                continue;
            }
            let own = norm(field.name);
            let names: Vec<String> = if pass == 0 {
                vec![own]
            } else {
                synonyms(entity, field.name)
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            };
            let hit = names
                .iter()
                .find_map(|n| (0..headers.len()).find(|&i| !taken[i] && normalised[i] == *n));
            if let Some(i) = hit {
                taken[i] = true;
                chosen.push((field.name, i));
            }
        }
    }
    let column = |i: usize| {
        rows.iter()
            .filter_map(move |r| r.get(i))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let mut proposal = Proposal {
        mapping: entity
            .fields()
            .iter()
            .filter_map(|f| {
                chosen
                    .iter()
                    .find(|(n, _)| *n == f.name)
                    .map(|(n, i)| (n.to_string(), headers[*i].clone()))
            })
            .collect(),
        unmapped: headers
            .iter()
            .enumerate()
            .filter(|(i, _)| !taken[*i])
            .map(|(_, h)| h.clone())
            .collect(),
        missing: entity
            .fields()
            .iter()
            .filter(|f| {
                f.required && f.absent == Absent::Null && !chosen.iter().any(|(n, _)| *n == f.name)
            })
            .map(|f| f.name.to_string())
            .collect(),
        date_format: None,
        date_ambiguous: false,
        decimal_separator: None,
        thousands_separator: None,
    };
    let of_kind = |want: fn(&FieldKind) -> bool| -> Vec<usize> {
        chosen
            .iter()
            .filter(|(n, _)| entity.field(n).is_some_and(|f| want(&f.kind)))
            .map(|(_, i)| *i)
            .collect()
    };
    let dates: Vec<&str> = of_kind(|k| matches!(k, FieldKind::Date))
        .into_iter()
        .flat_map(column)
        .collect();
    if !dates.is_empty() {
        let fits: Vec<&str> = DATE_FORMATS
            .iter()
            .copied()
            .filter(|f| {
                dates
                    .iter()
                    .all(|d| chrono::NaiveDate::parse_from_str(d, f).is_ok())
            })
            .collect();
        if let Some(first) = fits.first()
            && *first != "%Y-%m-%d"
        {
            proposal.date_format = Some(first.to_string());
            proposal.date_ambiguous = fits.len() > 1;
        }
    }
    let amounts: Vec<&str> = of_kind(|k| matches!(k, FieldKind::Money))
        .into_iter()
        .flat_map(column)
        .collect();
    let (decimal, thousands) = separators(&amounts);
    proposal.decimal_separator = decimal;
    proposal.thousands_separator = thousands;
    proposal
}

/// The decimal mark (`Some(",")` when it is a comma) and the digit-group separator the
/// amounts use: the last `.` or `,` followed by one or two digits is the decimal mark; a
/// separator followed by exactly three digits before the end or another separator groups.
fn separators(amounts: &[&str]) -> (Option<String>, Option<String>) {
    let mut comma_decimal = 0;
    let mut dot_decimal = 0;
    let mut groups: Option<char> = None;
    for a in amounts {
        let digits: String = a
            .chars()
            .filter(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | ' ' | '\'' | '\u{a0}'))
            .collect();
        let last = digits.rfind(['.', ',']);
        if let Some(at) = last {
            let tail = digits.len() - at - 1;
            let mark = digits.as_bytes()[at] as char;
            if (1..=2).contains(&tail) {
                if mark == ',' {
                    comma_decimal += 1;
                } else {
                    dot_decimal += 1;
                }
                if let Some(g) = digits[..at]
                    .chars()
                    .find(|c| matches!(c, '.' | ',' | ' ' | '\'' | '\u{a0}'))
                {
                    groups = Some(g);
                }
            } else if tail == 3 && groups.is_none() {
                groups = Some(mark);
            }
        } else if let Some(g) = digits.chars().find(|c| matches!(c, ' ' | '\'' | '\u{a0}')) {
            groups = Some(g);
        }
    }
    let comma = comma_decimal > dot_decimal;
    let thousands = groups
        .filter(|g| (comma && *g != ',') || (!comma && *g != '.'))
        .map(|g| {
            if g == '\u{a0}' {
                " ".to_string()
            } else {
                g.to_string()
            }
        });
    (comma.then(|| ",".to_string()), thousands)
}

/// The CSV delimiter of `text`'s first lines: the one of `,` `;` tab `|` that splits the
/// most lines into the same number (above one) of fields.
pub fn sniff_delimiter(text: &str) -> char {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(20)
        .collect();
    let mut best = (',', 0usize);
    for d in [',', ';', '\t', '|'] {
        let counts: Vec<usize> = lines.iter().map(|l| l.split(d).count()).collect();
        let Some(first) = counts.first().copied() else {
            continue;
        };
        let agreeing = counts.iter().filter(|c| **c == first).count();
        if first > 1 && agreeing * first > best.1 {
            best = (d, agreeing * first);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[&[&str]]) -> Vec<Vec<String>> {
        v.iter()
            .map(|r| r.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn spreadsheet_headers_map_to_invoice_fields() {
        let headers: Vec<String> = [
            "Invoice #",
            "Customer",
            "Date",
            "Due Date",
            "Currency",
            "Total",
            "Amount Due",
            "Notes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = propose(
            Entity::Invoices,
            &headers,
            &rows(&[&[
                "1001",
                "Acme",
                "2024-01-05",
                "2024-02-04",
                "EUR",
                "100.00",
                "10.00",
                "x",
            ]]),
        );
        let m: std::collections::BTreeMap<_, _> = p.mapping.iter().cloned().collect();
        assert_eq!(m["doc_number"], "Invoice #");
        assert_eq!(m["customer_name"], "Customer");
        assert_eq!(m["issue_date"], "Date");
        assert_eq!(m["due_date"], "Due Date");
        assert_eq!(m["total"], "Total");
        assert_eq!(m["balance"], "Amount Due");
        assert_eq!(p.unmapped, vec!["Notes".to_string()]);
        assert_eq!(p.missing, vec!["external_id".to_string()]);
        assert_eq!(p.date_format, None);
    }

    #[test]
    fn the_data_decides_day_first_or_month_first_and_the_separators() {
        let headers: Vec<String> = [
            "id",
            "issue_date",
            "due_date",
            "currency",
            "total",
            "balance",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let european = propose(
            Entity::Invoices,
            &headers,
            &rows(&[
                &["1", "31/12/2024", "15/01/2025", "EUR", "1.234,56", "0,00"],
                &["2", "02/03/2024", "01/04/2024", "EUR", "12,50", "12,50"],
            ]),
        );
        assert_eq!(european.date_format.as_deref(), Some("%d/%m/%Y"));
        assert!(!european.date_ambiguous);
        assert_eq!(european.decimal_separator.as_deref(), Some(","));
        assert_eq!(european.thousands_separator.as_deref(), Some("."));
        let american = propose(
            Entity::Invoices,
            &headers,
            &rows(&[
                &["1", "12/31/2024", "01/15/2025", "USD", "1,234.56", "0.00"],
                &["2", "03/02/2024", "04/01/2024", "USD", "12.50", "12.50"],
            ]),
        );
        assert_eq!(american.date_format.as_deref(), Some("%m/%d/%Y"));
        assert_eq!(american.decimal_separator, None);
        assert_eq!(american.thousands_separator.as_deref(), Some(","));
        let unclear = propose(
            Entity::Invoices,
            &headers,
            &rows(&[&["1", "02/03/2024", "04/05/2024", "USD", "10.00", "10.00"]]),
        );
        assert!(unclear.date_ambiguous);
        let swiss = separators(&["1'234.50", "99.90"]);
        assert_eq!(swiss, (None, Some("'".to_string())));
    }

    #[test]
    fn delimiters_are_sniffed() {
        assert_eq!(sniff_delimiter("a;b;c\n1;2,5;3\n4;5;6\n"), ';');
        assert_eq!(sniff_delimiter("a\tb\n1\t2\n"), '\t');
        assert_eq!(sniff_delimiter("a,b,c\n1,2,3\n"), ',');
    }
}
