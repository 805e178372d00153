//! Any text as a QuickBooks answer body: a query page for each stream, and an error body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_connectors::saas::quickbooks::{QboStream, error_summary};

const STREAMS: &[&str] = &[
    "Invoice",
    "CreditMemo",
    "Bill",
    "VendorCredit",
    "Payment",
    "BillPayment",
    "Customer",
    "Vendor",
    "Account",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let body = String::from_utf8_lossy(rest);
    let _ = error_summary(&body);
    if let Ok(stream) = QboStream::parse(STREAMS[usize::from(pick) % STREAMS.len()]) {
        let _ = stream.decode_query_answer(&body);
    }
});
