//! Writes `examples/bills.xlsx`, the spreadsheet behind `examples/bills.toml`: real Excel
//! date cells, a number stored as text, a formula with its cached value, an empty row, a
//! duplicate and a few bad rows. Run: `cargo run --example make_bills_xlsx`.

use rust_xlsxwriter::{ExcelDateTime, Format, Formula, Workbook, XlsxError};

enum Cell {
    Text(&'static str),
    Number(f64),
    Date(u16, u8, u8),
    Formula(&'static str, &'static str),
}
use Cell::*;

fn main() -> Result<(), XlsxError> {
    let header = [
        "BillId",
        "Number",
        "VendorRef",
        "Vendor",
        "IssueDate",
        "DueDate",
        "Currency",
        "Total",
        "Balance",
        "Status",
        "Kind",
        "Category",
        "LastModified",
    ];
    let rows: Vec<Vec<Cell>> = vec![
        vec![
            Text("B-501"),
            Text("V-7731"),
            Text("V-01"),
            Text("Acme Components"),
            Date(2024, 3, 4),
            Date(2024, 4, 3),
            Text("USD"),
            Number(1800.0),
            Number(1800.0),
            Text("open"),
            Text("bill"),
            Text("cogs"),
            Text("2024-03-04T10:00:00Z"),
        ],
        vec![
            Text("B-502"),
            Text("INV-88"),
            Text("V-02"),
            Text("Stadtwerke Köln"),
            Date(2024, 4, 20),
            Date(2024, 5, 20),
            Text("EUR"),
            Number(650.4),
            Number(650.4),
            Text("open"),
            Text("bill"),
            Text("expense"),
            Text("2024-04-20T09:00:00Z"),
        ],
        vec![
            Text("B-503"),
            Text("2024-117"),
            Text("V-03"),
            Text("Office Supplies Co"),
            Date(2024, 5, 2),
            Date(2024, 6, 1),
            Text("USD"),
            Text("1,250.00"),
            Text("1,250.00"),
            Text("open"),
            Text("bill"),
            Text("expense"),
            Text("2024-05-02T12:00:00Z"),
        ],
        vec![
            Text("B-504"),
            Text("Q2-CLOUD"),
            Text("V-04"),
            Text("Cloud Hosting Ltd"),
            Date(2024, 6, 1),
            Date(2024, 7, 1),
            Text("USD"),
            Formula("=1000*1.1", "1100"),
            Formula("=1000*1.1", "1100"),
            Text("open"),
            Text("bill"),
            Text("cogs"),
            Text("2024-06-01T08:00:00Z"),
        ],
        vec![],
        vec![
            Text("B-505"),
            Text("R-55"),
            Text("V-05"),
            Text("London Couriers"),
            Date(2024, 5, 10),
            Date(2024, 6, 9),
            Text("GBP"),
            Number(320.0),
            Number(0.0),
            Text("paid"),
            Text("bill"),
            Text("expense"),
            Text("2024-06-05T16:00:00Z"),
        ],
        vec![
            Text("B-506"),
            Text("CN-9"),
            Text("V-01"),
            Text("Acme Components"),
            Date(2024, 4, 15),
            Date(2024, 5, 15),
            Text("USD"),
            Number(150.0),
            Number(150.0),
            Text("open"),
            Text("Credit Note"),
            Text("cogs"),
            Text("2024-04-15T10:00:00Z"),
        ],
        vec![
            Text("B-501"),
            Text("V-7731"),
            Text("V-01"),
            Text("Acme Components"),
            Date(2024, 3, 4),
            Date(2024, 4, 3),
            Text("USD"),
            Number(1800.0),
            Number(900.0),
            Text("open"),
            Text("bill"),
            Text("cogs"),
            Text("2024-05-01T10:00:00Z"),
        ],
        vec![
            Text("B-507"),
            Text("F-12"),
            Text("V-06"),
            Text("Paris Fournitures"),
            Date(2024, 5, 5),
            Date(2024, 6, 4),
            Text("EURO"),
            Number(75.0),
            Number(75.0),
            Text("open"),
            Text("bill"),
            Text("expense"),
            Text("2024-05-05T10:00:00Z"),
        ],
        vec![
            Text("B-508"),
            Text("T-3"),
            Text("V-03"),
            Text("Office Supplies Co"),
            Date(2024, 5, 8),
            Date(2024, 6, 7),
            Text("USD"),
            Number(80.0),
            Number(95.0),
            Text("open"),
            Text("bill"),
            Text("expense"),
            Text("2024-05-08T10:00:00Z"),
        ],
        vec![
            Text("B-509"),
            Text("T-4"),
            Text("V-03"),
            Text("Office Supplies Co"),
            Date(2024, 5, 9),
            Text("31/02/2024"),
            Text("USD"),
            Number(60.0),
            Number(60.0),
            Text("open"),
            Text("bill"),
            Text("expense"),
            Text("2024-05-09T10:00:00Z"),
        ],
    ];

    let mut workbook = Workbook::new();
    let date = Format::new().set_num_format("yyyy-mm-dd");
    let sheet = workbook.add_worksheet();
    sheet.set_name("Bills")?;
    for (c, h) in header.iter().enumerate() {
        sheet.write_string(0, c as u16, *h)?;
    }
    for (r, row) in rows.iter().enumerate() {
        let r = r as u32 + 1;
        for (c, cell) in row.iter().enumerate() {
            let c = c as u16;
            match cell {
                Text(s) => sheet.write_string(r, c, *s).map(|_| ())?,
                Number(n) => sheet.write_number(r, c, *n).map(|_| ())?,
                Date(y, m, d) => sheet
                    .write_datetime_with_format(r, c, ExcelDateTime::from_ymd(*y, *m, *d)?, &date)
                    .map(|_| ())?,
                Formula(f, v) => sheet
                    .write_formula(r, c, Formula::new(*f).set_result(*v))
                    .map(|_| ())?,
            }
        }
    }
    let notes = workbook.add_worksheet();
    notes.set_name("Notes")?;
    notes.write_string(
        0,
        0,
        "Exported from the AP ledger; amounts in document currency.",
    )?;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bills.xlsx");
    workbook.save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
