//! Any text as an Odoo JSON-RPC `search_read` answer, for each stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_connectors::saas::odoo::OdooStream;

const STREAMS: &[&str] = &[
    "invoices",
    "bills",
    "payments",
    "customers",
    "vendors",
    "accounts",
    "account.move:out_refund",
    "account.move:in_refund",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let body = String::from_utf8_lossy(rest);
    if let Ok(stream) = OdooStream::parse(STREAMS[usize::from(pick) % STREAMS.len()]) {
        let _ = stream.decode_search_read(&body);
    }
});
