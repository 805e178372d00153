//! CSV edge cases, each with its expected outcome.

use std::path::Path;

use arrow_array::{Array, StringArray};
use futures_util::StreamExt;
use serde_json::Value;
use sluice_connectors::file::{CsvOptions, CsvSource};
use sluice_connectors::{ReadRequest, RejectedRecord, Source, SourceErrorKind};

struct Read {
    headers: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
    positions: Vec<u64>,
    rejects: Vec<RejectedRecord>,
    cursors: Vec<Value>,
}

async fn read_all(source: &CsvSource, from: Option<Value>, batch_rows: usize) -> Read {
    let mut stream = source
        .read(ReadRequest {
            stream: "f".into(),
            from,
            batch_rows,
        })
        .await
        .expect("readable");
    let mut out = Read {
        headers: vec![],
        rows: vec![],
        positions: vec![],
        rejects: vec![],
        cursors: vec![],
    };
    while let Some(batch) = stream.next().await {
        let batch = batch.expect("batch");
        out.headers = batch
            .records
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        for r in 0..batch.records.num_rows() {
            out.rows.push(
                batch
                    .records
                    .columns()
                    .iter()
                    .map(|c| {
                        let a = c.as_any().downcast_ref::<StringArray>().expect("utf8");
                        a.is_valid(r).then(|| a.value(r).to_string())
                    })
                    .collect(),
            );
        }
        out.positions.extend(&batch.positions);
        out.rejects.extend(batch.rejects);
        out.cursors.push(batch.cursor);
    }
    out
}

fn file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

#[tokio::test]
async fn bom_crlf_and_quoted_newlines_are_read_as_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = file(
        dir.path(),
        "a.csv",
        b"\xEF\xBB\xBFid,name\r\n1,\"Smith, J\"\r\n2,\"two\r\nlines\"\r\n3,\"say \"\"hi\"\"\"\r\n",
    );
    let r = read_all(&CsvSource::new(&p, CsvOptions::default()), None, 100).await;
    assert_eq!(
        r.headers,
        ["id", "name"],
        "the BOM is not part of the first header"
    );
    assert_eq!(
        r.rows,
        vec![
            vec![s("1"), s("Smith, J")],
            vec![s("2"), s("two\r\nlines")],
            vec![s("3"), s("say \"hi\"")]
        ]
    );
    assert_eq!(
        r.positions,
        [2, 3, 5],
        "positions are the lines records start on"
    );
}

#[tokio::test]
async fn delimiter_quote_and_headerless_options() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = file(dir.path(), "b.csv", b"1;'a;b'\n2;c\n");
    let opts = CsvOptions {
        delimiter: b';',
        quote: b'\'',
        has_header: false,
    };
    let r = read_all(&CsvSource::new(&p, opts), None, 100).await;
    assert_eq!(r.headers, ["column_1", "column_2"]);
    assert_eq!(r.rows, vec![vec![s("1"), s("a;b")], vec![s("2"), s("c")]]);
    assert_eq!(r.positions, [1, 2]);
}

#[tokio::test]
async fn ragged_rows_are_rejected_with_their_line_and_values() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = file(
        dir.path(),
        "c.csv",
        b"id,total\n1,10\n2\n3,30,extra\n4,40\n",
    );
    let r = read_all(&CsvSource::new(&p, CsvOptions::default()), None, 100).await;
    assert_eq!(r.rows.len(), 2);
    assert_eq!(r.rejects.len(), 2);
    assert_eq!(
        (r.rejects[0].position, r.rejects[0].rule),
        (3, "ragged_row")
    );
    assert_eq!(
        r.rejects[1].raw.get("_extra_3"),
        Some(&Value::String("extra".into()))
    );
    assert_eq!(r.rejects[1].raw.get("id"), Some(&Value::String("3".into())));
}

#[tokio::test]
async fn unusable_files_fail_before_the_first_batch_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases: Vec<(&str, Vec<u8>, SourceErrorKind, &str)> = vec![
        ("empty.csv", vec![], SourceErrorKind::Format, "empty"),
        (
            "binary.csv",
            vec![0x7f, b'E', b'L', b'F', 0, 0, 1, 0],
            SourceErrorKind::Format,
            "binary",
        ),
        (
            "latin1.csv",
            b"id,name\n1,Jos\xe9\n".to_vec(),
            SourceErrorKind::Format,
            "not valid UTF-8 at line 2",
        ),
        (
            "utf16.csv",
            vec![0xFF, 0xFE, b'i', 0, b'd', 0],
            SourceErrorKind::Format,
            "UTF-16",
        ),
        (
            "book.csv",
            b"PK\x03\x04rest".to_vec(),
            SourceErrorKind::Format,
            "ZIP",
        ),
    ];
    for (name, bytes, kind, words) in cases {
        let p = file(dir.path(), name, &bytes);
        let err = CsvSource::new(&p, CsvOptions::default())
            .read(ReadRequest {
                stream: "f".into(),
                from: None,
                batch_rows: 10,
            })
            .await
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"));
        assert_eq!(err.kind(), kind, "{name}");
        assert!(err.to_string().contains(words), "{name}: {err}");
        assert!(
            err.to_string().contains(name),
            "the message names the file: {err}"
        );
    }
    let missing = CsvSource::new(dir.path().join("nope.csv"), CsvOptions::default());
    let err = missing
        .read(ReadRequest {
            stream: "f".into(),
            from: None,
            batch_rows: 10,
        })
        .await
        .err()
        .expect("missing file");
    assert_eq!(err.kind(), SourceErrorKind::NotFound);
    assert!(err.to_string().contains("file not found"), "{err}");
}

#[tokio::test]
async fn duplicate_headers_are_an_error_and_blank_ones_get_names() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = file(dir.path(), "d.csv", b"id,total,id\n1,2,3\n");
    let err = CsvSource::new(&p, CsvOptions::default())
        .streams()
        .await
        .expect_err("ambiguous header");
    assert!(err.to_string().contains("appears twice"), "{err}");
    let p = file(dir.path(), "e.csv", b"id,,total\n1,x,2\n");
    let r = read_all(&CsvSource::new(&p, CsvOptions::default()), None, 10).await;
    assert_eq!(r.headers, ["id", "column_2", "total"]);
}

#[tokio::test]
async fn header_only_file_yields_no_rows() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = file(dir.path(), "h.csv", b"id,total\n");
    let r = read_all(&CsvSource::new(&p, CsvOptions::default()), None, 10).await;
    assert!(r.rows.is_empty() && r.rejects.is_empty());
}

#[tokio::test]
async fn resuming_from_a_batch_cursor_reads_exactly_the_rest() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut body = String::from("id,note\n");
    for i in 0..1000 {
        if i % 7 == 0 {
            body.push_str(&format!("{i},\"multi\nline\"\n"));
        } else {
            body.push_str(&format!("{i},x\n"));
        }
    }
    let p = file(dir.path(), "r.csv", body.as_bytes());
    let source = CsvSource::new(&p, CsvOptions::default());
    let full = read_all(&source, None, 128).await;
    assert_eq!(full.rows.len(), 1000);
    let after_third = full.cursors[2].clone();
    let rest = read_all(&source, Some(after_third), 128).await;
    assert_eq!(rest.rows.len(), 1000 - 3 * 128);
    assert_eq!(rest.rows[0][0], s("384"));
    assert_eq!(
        rest.positions[0], full.positions[384],
        "line numbers continue where they left off"
    );

    // A cursor made for another version of the file is not honoured.
    std::fs::write(&p, "id,note\n9999,y\n").expect("rewrite");
    let changed = read_all(&source, Some(full.cursors[2].clone()), 128).await;
    assert_eq!(changed.rows, vec![vec![s("9999"), s("y")]]);
}

#[tokio::test]
async fn a_line_or_a_record_over_a_mebibyte_fails_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut long_line = b"id,note\n1,".to_vec();
    long_line.extend(std::iter::repeat_n(b'x', 2 << 20));
    long_line.push(b'\n');
    let p = file(dir.path(), "long.csv", &long_line);
    let err = CsvSource::new(&p, CsvOptions::default())
        .streams()
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), SourceErrorKind::Format);
    assert!(err.to_string().contains("max_record_bytes"), "{err}");
    assert!(err.to_string().contains("line 2"), "{err}");

    // Short lines, but one quoted field spanning them all.
    let mut many_lines = b"id,note\n1,\"".to_vec();
    for _ in 0..30_000 {
        many_lines.extend_from_slice(&[b'y'; 40]);
        many_lines.push(b'\n');
    }
    many_lines.extend_from_slice(b"\"\n2,ok\n");
    let p = file(dir.path(), "tall.csv", &many_lines);
    let source = CsvSource::new(&p, CsvOptions::default());
    let mut stream = source
        .read(ReadRequest {
            stream: "f".into(),
            from: None,
            batch_rows: 10,
        })
        .await
        .expect("opens");
    let mut failed = None;
    while let Some(batch) = stream.next().await {
        if let Err(e) = batch {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("the record is refused");
    assert!(err.to_string().contains("max_record_bytes"), "{err}");
}
