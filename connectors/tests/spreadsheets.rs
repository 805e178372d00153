//! Spreadsheet edge cases: Excel dates, numbers as text, formulas, empty rows, sheet
//! selection, corrupt files.

use std::path::{Path, PathBuf};

use arrow_array::{Array, StringArray};
use futures_util::StreamExt;
use rust_xlsxwriter::{ExcelDateTime, Format, Formula, Workbook};
use serde_json::Value;
use sluice_connectors::file::{SheetRef, SpreadsheetSource};
use sluice_connectors::{ReadRequest, Source, SourceErrorKind};

fn workbook(dir: &Path) -> PathBuf {
    let mut wb = Workbook::new();
    let first = wb.add_worksheet();
    first.set_name("Cover").expect("name");
    first.write_string(0, 0, "not the data").expect("write");
    let sheet = wb.add_worksheet();
    sheet.set_name("Bills").expect("name");
    let date = Format::new().set_num_format("dd/mm/yyyy");
    let stamp = Format::new().set_num_format("yyyy-mm-dd hh:mm");
    sheet
        .write_string(0, 0, "Exported 2024-06-30")
        .expect("title row");
    for (c, h) in ["id", "issued", "total", "text_total", "formula", "stamp"]
        .iter()
        .enumerate()
    {
        sheet.write_string(2, c as u16, *h).expect("header");
    }
    sheet.write_string(3, 0, "B1").expect("w");
    sheet
        .write_datetime_with_format(
            3,
            1,
            ExcelDateTime::from_ymd(2024, 2, 29).expect("d"),
            &date,
        )
        .expect("w");
    sheet.write_number(3, 2, 1234.5).expect("w");
    sheet.write_string(3, 3, "1,234.50").expect("w");
    sheet
        .write_formula(
            3,
            4,
            Formula::new("=C4*1.1").set_result("1357.9500000000002"),
        )
        .expect("w");
    let dt = ExcelDateTime::parse_from_str("2024-03-01 13:45:00").expect("dt");
    sheet
        .write_datetime_with_format(3, 5, dt, &stamp)
        .expect("w");
    // row 5 (index 4) left empty on purpose
    sheet.write_string(5, 0, "B2").expect("w");
    sheet.write_number(5, 2, 7.0).expect("w");
    sheet.write_string(6, 0, "B3").expect("w");
    sheet.write_string(6, 7, "stray note").expect("w");
    let path = dir.join("book.xlsx");
    wb.save(&path).expect("save");
    path
}

async fn read(
    source: &SpreadsheetSource,
    from: Option<Value>,
) -> (
    Vec<String>,
    Vec<Vec<Option<String>>>,
    Vec<u64>,
    Vec<u64>,
    Vec<Value>,
) {
    let mut stream = source
        .read(ReadRequest {
            stream: "s".into(),
            from,
            batch_rows: 1,
        })
        .await
        .expect("readable");
    let (mut headers, mut rows, mut positions, mut rejected, mut cursors) =
        (vec![], vec![], vec![], vec![], vec![]);
    while let Some(b) = stream.next().await {
        let b = b.expect("batch");
        headers = b
            .records
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        for r in 0..b.records.num_rows() {
            rows.push(
                b.records
                    .columns()
                    .iter()
                    .map(|c| {
                        let a = c.as_any().downcast_ref::<StringArray>().expect("utf8");
                        a.is_valid(r).then(|| a.value(r).to_string())
                    })
                    .collect(),
            );
        }
        positions.extend(&b.positions);
        rejected.extend(b.rejects.iter().map(|r| r.position));
        assert_eq!(b.sheet.as_deref(), Some("Bills"));
        cursors.push(b.cursor);
    }
    (headers, rows, positions, rejected, cursors)
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

#[tokio::test]
async fn cells_read_as_a_person_sees_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = workbook(dir.path());
    let source = SpreadsheetSource::new(&path, SheetRef::Name("Bills".into()), 3);
    let (headers, rows, positions, rejected, _) = read(&source, None).await;
    assert_eq!(
        headers,
        ["id", "issued", "total", "text_total", "formula", "stamp"]
    );
    assert_eq!(
        rows[0],
        vec![
            s("B1"),
            s("2024-02-29"),
            s("1234.5"),
            s("1,234.50"),
            s("1357.95"),
            s("2024-03-01T13:45:00")
        ]
    );
    assert_eq!(rows[1], vec![s("B2"), None, s("7"), None, None, None]);
    assert_eq!(
        positions,
        [4, 6],
        "sheet row numbers; the empty row 5 is skipped"
    );
    assert_eq!(
        rejected,
        [7],
        "a value beyond the header columns is not silently dropped"
    );
}

#[tokio::test]
async fn sheet_by_index_and_resume_from_cursor() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = workbook(dir.path());
    let source = SpreadsheetSource::new(&path, SheetRef::Index(1), 3);
    let (_, rows, _, _, cursors) = read(&source, None).await;
    assert_eq!(rows.len(), 2);
    let (_, rest, positions, rejected, _) = read(&source, Some(cursors[0].clone())).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(positions, [6]);
    assert_eq!(rejected, [7]);
}

#[tokio::test]
async fn missing_sheet_and_corrupt_files_fail_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = workbook(dir.path());
    let err = SpreadsheetSource::new(&path, SheetRef::Name("Invoices".into()), 1)
        .streams()
        .await
        .expect_err("no such sheet");
    assert_eq!(err.kind(), SourceErrorKind::Config);
    assert!(
        err.to_string().contains("Cover, Bills"),
        "lists the sheets: {err}"
    );

    let corrupt = dir.path().join("corrupt.xlsx");
    std::fs::write(&corrupt, b"PK\x03\x04 this is not really a zip").expect("write");
    let err = SpreadsheetSource::new(&corrupt, SheetRef::Index(0), 1)
        .streams()
        .await
        .expect_err("corrupt");
    assert_eq!(err.kind(), SourceErrorKind::Format);
    assert!(
        err.to_string().contains("not a readable spreadsheet"),
        "{err}"
    );

    let csv_named_xls = dir.path().join("data.xls");
    std::fs::write(&csv_named_xls, b"id,total\n1,2\n").expect("write");
    let err = SpreadsheetSource::new(&csv_named_xls, SheetRef::Index(0), 1)
        .streams()
        .await
        .expect_err("not xls");
    assert_eq!(err.kind(), SourceErrorKind::Format);

    let empty_header = SpreadsheetSource::new(&path, SheetRef::Name("Bills".into()), 2)
        .streams()
        .await
        .expect_err("empty header row");
    assert!(
        empty_header.to_string().contains("header row"),
        "{empty_header}"
    );
}

/// A minimal OpenDocument spreadsheet, written by hand: the range reader path (ODS, and
/// likewise XLS/XLSB) must give the same text as the streaming XLSX path.
fn ods(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("bills.ods");
    let file = std::fs::File::create(&path).expect("create");
    let mut zip = zip::ZipWriter::new(file);
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("mimetype", stored).expect("mimetype");
    zip.write_all(b"application/vnd.oasis.opendocument.spreadsheet")
        .expect("w");
    zip.start_file("META-INF/manifest.xml", stored)
        .expect("manifest");
    zip.write_all(br#"<?xml version="1.0" encoding="UTF-8"?>
<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">
<manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/>
<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>
</manifest:manifest>"#).expect("w");
    zip.start_file("content.xml", stored).expect("content");
    let cell_s = |v: &str| {
        format!(
            r#"<table:table-cell office:value-type="string"><text:p>{v}</text:p></table:table-cell>"#
        )
    };
    let cell_f = |v: &str| {
        format!(
            r#"<table:table-cell office:value-type="float" office:value="{v}"><text:p>{v}</text:p></table:table-cell>"#
        )
    };
    let cell_d = |v: &str| {
        format!(
            r#"<table:table-cell office:value-type="date" office:date-value="{v}"><text:p>{v}</text:p></table:table-cell>"#
        )
    };
    let rows = [
        format!("{}{}{}", cell_s("id"), cell_s("issued"), cell_s("total")),
        format!(
            "{}{}{}",
            cell_s("B1"),
            cell_d("2024-02-29"),
            cell_f("1234.5")
        ),
        String::new(),
        format!("{}{}{}", cell_s("B2"), cell_d("2024-03-01"), cell_f("7")),
    ];
    let body: String = rows
        .iter()
        .map(|r| format!("<table:table-row>{r}</table:table-row>"))
        .collect();
    write!(
        zip,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2">
<office:body><office:spreadsheet><table:table table:name="Bills">{body}</table:table></office:spreadsheet></office:body></office:document-content>"#
    )
    .expect("w");
    zip.finish().expect("finish");
    path
}

#[tokio::test]
async fn ods_is_read_through_the_range_reader() {
    let dir = tempfile::tempdir().expect("tmp");
    let source = SpreadsheetSource::new(ods(dir.path()), SheetRef::Name("Bills".into()), 1);
    let (headers, rows, positions, rejected, _) = read(&source, None).await;
    assert_eq!(headers, ["id", "issued", "total"]);
    assert_eq!(
        rows,
        vec![
            vec![s("B1"), s("2024-02-29"), s("1234.5")],
            vec![s("B2"), s("2024-03-01"), s("7")]
        ]
    );
    assert_eq!(
        positions,
        [2, 4],
        "the empty row 3 is skipped, row numbers kept"
    );
    assert!(rejected.is_empty());
}

/// A minimal XLSX workbook written by hand, with `sheet` as its one worksheet's XML and
/// `shared` as its shared-strings part, deflated.
fn raw_xlsx(dir: &Path, name: &str, sheet: &[u8], shared: Option<&str>) -> PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create");
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let mut part = |name: &str, body: &[u8]| {
        zip.start_file(name, opts).expect("part");
        zip.write_all(body).expect("write");
    };
    part(
        "[Content_Types].xml",
        br#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/><Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>"#,
    );
    part(
        "_rels/.rels",
        br#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>"#,
    );
    part(
        "xl/workbook.xml",
        br#"<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets><sheet name="S" sheetId="1" r:id="rId1"/></sheets></workbook>"#,
    );
    part(
        "xl/_rels/workbook.xml.rels",
        br#"<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/><Relationship Id="rId2" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/sharedStrings" Target="sharedStrings.xml"/></Relationships>"#,
    );
    if let Some(shared) = shared {
        part("xl/sharedStrings.xml", shared.as_bytes());
    }
    part("xl/worksheets/sheet1.xml", sheet);
    zip.finish().expect("finish");
    path
}

fn sheet_xml(cells: &str) -> Vec<u8> {
    format!(r#"<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>{cells}</sheetData></worksheet>"#).into_bytes()
}

#[tokio::test]
async fn hostile_workbooks_fail_their_run_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    // A sane one reads.
    let ok = raw_xlsx(
        dir.path(),
        "ok.xlsx",
        &sheet_xml(
            r#"<row r="1"><c r="A1" t="inlineStr"><is><t>id</t></is></c></row><row r="2"><c r="A2"><v>7</v></c></row>"#,
        ),
        None,
    );
    SpreadsheetSource::new(&ok, SheetRef::Index(0), 1)
        .streams()
        .await
        .expect("a sane workbook reads");

    let cases: Vec<(PathBuf, &str)> = vec![
        (
            raw_xlsx(
                dir.path(),
                "wide.xlsx",
                &sheet_xml(
                    r#"<row r="1"><c r="A1" t="inlineStr"><is><t>id</t></is></c><c r="ZZZZZZ1"><v>1</v></c></row>"#,
                ),
                None,
            ),
            "max_columns",
        ),
        (
            raw_xlsx(
                dir.path(),
                "tall.xlsx",
                &sheet_xml(
                    r#"<row r="1"><c r="A1"><v>1</v></c></row><row r="99999999"><c r="A99999999"><v>1</v></c></row>"#,
                ),
                None,
            ),
            "max_rows",
        ),
        (
            raw_xlsx(
                dir.path(),
                "strings.xlsx",
                &sheet_xml(r#"<row r="1"><c r="A1" t="s"><v>0</v></c></row>"#),
                Some(
                    r#"<?xml version="1.0" encoding="UTF-8"?><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" count="1" uniqueCount="4000000000"><si><t>id</t></si></sst>"#,
                ),
            ),
            "max_shared_strings",
        ),
        (
            // 16 MiB of empty elements inside the sheet: they deflate ~1000:1.
            raw_xlsx(
                dir.path(),
                "bomb.xlsx",
                &{
                    let mut xml = sheet_xml(r#"<row r="1"><c r="A1"><v>1</v></c></row>"#);
                    let at = xml.len() - "</sheetData></worksheet>".len();
                    xml.splice(at..at, b"<x/>".iter().copied().cycle().take(16 << 20));
                    xml
                },
                None,
            ),
            "max_ratio",
        ),
        (
            // One shared string of 2 MiB.
            raw_xlsx(
                dir.path(),
                "cell.xlsx",
                &sheet_xml(r#"<row r="1"><c r="A1" t="s"><v>0</v></c></row>"#),
                Some(&format!(
                    r#"<?xml version="1.0" encoding="UTF-8"?><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" count="1" uniqueCount="1"><si><t>{}</t></si></sst>"#,
                    "z".repeat(2 << 20)
                )),
            ),
            "max_cell_bytes",
        ),
    ];
    for (path, limit) in cases {
        let started = std::time::Instant::now();
        let err = SpreadsheetSource::new(&path, SheetRef::Index(0), 1)
            .streams()
            .await
            .expect_err("over a limit");
        assert_eq!(err.kind(), SourceErrorKind::Format, "{err}");
        assert!(err.to_string().contains(limit), "{}: {err}", path.display());
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}
