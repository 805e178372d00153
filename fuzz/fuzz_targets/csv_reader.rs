//! Any bytes as a CSV file: the reader either yields batches or a clear error, never
//! panics, and reads every record it reports.
#![no_main]

use futures_util::StreamExt;
use libfuzzer_sys::fuzz_target;
use sluice_connectors::file::{CsvOptions, CsvSource};
use sluice_connectors::{ReadRequest, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("f.csv");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let source = CsvSource::new(
            &path,
            CsvOptions {
                delimiter: b',',
                quote: b'"',
                has_header: true,
            },
        );
        let Ok(streams) = source.streams().await else {
            return;
        };
        let Ok(mut batches) = source
            .read(ReadRequest {
                stream: streams[0].name.clone(),
                from: None,
                batch_rows: 7,
            })
            .await
        else {
            return;
        };
        while let Some(batch) = batches.next().await {
            if batch.is_err() {
                break;
            }
        }
    });
});
